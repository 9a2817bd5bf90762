"""Thin adapters between cloudckpt and other frameworks (imported on demand, never by ``cloudckpt``).

* :mod:`cloudckpt.integrations.dcp`: ``torch.distributed.checkpoint`` StorageWriter / StorageReader.
* :mod:`cloudckpt.integrations.lightning`: Lightning ``CheckpointIO`` plugin and checkpoint callback
  (``pip install 'cloudckpt[lightning]'``).
* :mod:`cloudckpt.integrations.hf`: a ``transformers.TrainerCallback`` (``pip install 'cloudckpt[hf]'``).
"""
