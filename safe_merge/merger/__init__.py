"""The merge: a validated request, the rules that refuse before any work, the job they leave, the backends that
merge and write (behind one protocol), and the pipeline that verifies and publishes."""
