"""The reliability suite's tests report what they tried ("crash points tried: N, partial
checkpoints visible: 0, data lost: 0") through :func:`reliability_util.report`; the lines are
printed as they happen (visible with ``-s``) and repeated in a "cloudckpt reliability counts"
section at the end of the run by the root conftest (tests/conftest.py), also under ``pytest -n``."""
