"""Batch collation for packed SFT rows."""

from dataclasses import dataclass

from trl.trainer.sft_trainer import DataCollatorForLanguageModeling


@dataclass
class PackedRowsCollator(DataCollatorForLanguageModeling):
    """Packed rows stay separate batch rows, with position ids restarting at every sample and no attention mask.

    From such position ids transformers builds a block-diagonal causal mask for sdpa/eager, so a sample never
    attends to another one in its row. (TRL's padding-free mode flattens the whole batch into one row instead:
    right for flash-attention's varlen kernels, but twice as slow under sdpa, whose cost grows with row length².)
    """

    return_position_ids: bool = True

    def torch_call(self, examples: list[dict]) -> dict:
        batch = super().torch_call(examples)
        # A 2D mask would switch off packed-sequence detection; right padding under a causal mask needs none.
        del batch["attention_mask"]
        return batch
