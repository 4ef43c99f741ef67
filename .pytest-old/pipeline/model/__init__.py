"""The network: the backbone registry (``backbones``), the Keras models built from it (``networks``),
where they run (``devices``), the cached backbone outputs (``feature_store``) and resumable
training state (``checkpoints``)."""
