"""Images and the files that describe them: decoding a photo into the model's input (``images``),
the augmentation policy (``augmentation``) and the manifests stages hand to each other (``manifests``)."""
