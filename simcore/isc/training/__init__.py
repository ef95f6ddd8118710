"""The components of ``simcore train`` (``simcore.isc.train`` holds the ``Trainer`` that runs them).

- ``config``:      ``TrainConfig`` and its whole validation; ``StagePlan`` (the drip stages against the data)
- ``sources``:     where the images come from (``DataSource``: an image folder, a file list, the next formats)
- ``validators``:  what a stage end measures (``Validator``: today the µAP of augmented copies)
- ``sinks``:       log.jsonl, TensorBoard, the progress bar, loss.png (``MetricsSink``)
- ``checkpoints``: writing, reading and resharding checkpoints; the resume checks (``CheckpointManager``)
- ``distributed``: this process's place in a ``torchrun`` world (``Dist``)

docs/architecture.md draws a training step through them.
"""
