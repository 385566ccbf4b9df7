"""Sample N images in resumable shards and compute FID / FD-digits (see diffsamplers.apps.fid_job)."""

from diffsamplers.apps.fid_job import main

if __name__ == "__main__":
    raise SystemExit(main())
