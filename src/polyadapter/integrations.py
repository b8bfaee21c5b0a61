"""Glue for Hugging Face's training tools. None is needed to train: ``Trainer``,
TRL's ``SFTTrainer`` and ``accelerate`` take an ``AdapterModel`` as it is (its forward
reports the base's signature, its ``state_dict`` holds only the adapters). This adds a
checkpoint in polyadapter's own folder format on request.

    trainer = Trainer(model=pm, args=args, train_dataset=data,
                      callbacks=[SaveAdapterCallback("topic", format="peft")])
"""
from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback


class SaveAdapterCallback(TrainerCallback):
    """Also write adapter ``name`` as a native (or PEFT) folder into every checkpoint,
    as ``checkpoint-N/<folder>``, loadable with ``load_adapter`` or ``polyadapter info``."""

    def __init__(self, name: str, format: str = "native", folder: str = "adapter"):
        self.name, self.format, self.folder = name, format, folder

    def on_save(self, args, state, control, model=None, **kwargs):
        if model is None or not args.should_save:
            return control
        pm = getattr(model, "module", model)  # unwrapped from DistributedDataParallel, if wrapped
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        pm.save_adapter(self.name, checkpoint / self.folder, format=self.format, overwrite=True)
        return control
