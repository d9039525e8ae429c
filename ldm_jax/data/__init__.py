"""Input pipelines (grain): embedded sample photos, image folders and TFDS ArrayRecord
(``python -m ldm_jax.data.pack`` packs a folder into the latter)."""

from ldm_jax.data.pipeline import (class_names, create_eval_batches, create_record_iterator,
                                   create_train_iterator, ordered_batches, skipped_count,
                                   skipped_files)

__all__ = ["create_train_iterator", "create_record_iterator", "create_eval_batches", "skipped_count", "skipped_files", "class_names", "ordered_batches"]
