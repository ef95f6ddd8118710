"""The ISC 2021 copy-detection application, built on simcore's public ops only:
augmented copies (augment), descriptor post-processing (descriptors), the
challenge metric (metrics), the ``simcore`` command (cli) and the end-to-end
demo (demo); training from image folders (data, backbones, train) and
descriptors from checkpoints (embed); for face recognition and re-identification, the
RecordIO and WebDataset readers (recordio, shards, encoded), their metrics
(verification, reid), backbones (face_backbones), gradient accumulation
(accumulate) and export (export). See docs/isc.md, docs/train.md and
docs/face_reid.md."""
