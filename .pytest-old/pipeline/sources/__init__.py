"""Getting the user's images into the pipeline: fetching and checking a source (``fetch``),
unpacking archives safely (``archives``), copying folders (``folders``), the labels table
(``labels_table``), finding the images in any layout (``layouts``), duplicates (``dedupe``) and
splits (``splits``). The download and prepare stages are built from these."""
