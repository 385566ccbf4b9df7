"""Sample N images in resumable shards and compute FID / FD-digits: ``diffsamplers fid`` (same arguments; see
diffsamplers.apps.fid_job). Bad arguments end in one line and exit status 2."""

from diffsamplers.apps.fid_job import main

if __name__ == "__main__":
    raise SystemExit(main())
