"""Sample N images in resumable shards and compute FID / FD-digits (see diffsamplers.evaluation.fid_job)."""

from diffsamplers.evaluation.fid_job import main

if __name__ == "__main__":
    raise SystemExit(main())
