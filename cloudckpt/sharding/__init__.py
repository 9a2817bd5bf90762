"""Sharded, resharding checkpoints on torch.distributed.checkpoint's planners, for DistributedCheckpointManager.

* :mod:`.state`: which entries are resharded through DCP and how they become DCP state dicts;
* :mod:`.planners`: DCP's planners with JSON values and a gather-free split of who writes what;
* :mod:`.part`: one rank's part (what it stored), written before the commit;
* :mod:`.load`: loading parts into live state (any world size) or whole into one process.
"""
