"""The ISC 2021 copy-detection application, built on simcore's public ops only:
augmented copies (augment), descriptor post-processing (descriptors), the
challenge metric (metrics), the ``simcore`` command (cli) and the end-to-end
demo (demo); training from image folders (data, backbones, train) and
descriptors from checkpoints (embed). See docs/isc.md and docs/train.md."""
