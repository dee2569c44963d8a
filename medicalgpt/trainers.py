"""TRL's preference trainers, fed with our token ids.

Every stage renders conversations with the same token-level chat template (medicalgpt.templates), so
these subclasses only skip each trainer's own tokenization of text; losses, reference models, logging
and checkpointing stay TRL's.
"""

import torch
from torch.utils.checkpoint import checkpoint
from transformers import Trainer
from trl import DPOTrainer, KTOTrainer, SFTTrainer
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer
from trl.trainer.utils import FusedCausalLMOutput

from medicalgpt.templates import IGNORE_INDEX


class CPUFriendlySFTTrainer(SFTTrainer):
    """TRL's SFTTrainer, but CPU training steps take the plain LM head and the model's own loss.

    TRL's fused head saves GPU memory at 150k-token vocabularies by recomputing the head in backward, scoring every
    position and computing entropy and top-1 accuracy for its logs; on CPU, with RAM to spare, that made SFT steps
    slower (benchmarks/README.md, MFU). Evaluation and MoE models keep TRL's path.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # MoE keeps TRL's path: it logs the router aux loss and scales it for gradient accumulation.
        if not (self.args.use_cpu and model.training) or self.aux_loss_enabled:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return Trainer.compute_loss(self, model, {**inputs, "use_cache": False}, return_outputs, num_items_in_batch)


class _HalfBatches:
    """The policy called on TRL's concatenated [chosen; rejected] batch as two half batches, the chosen half
    checkpointed (its forward is re-run, with the same dropout masks, when backward reaches it).

    One half's activations are held at a time: the rejected half's until its backward is done, then the chosen
    half's recomputed ones (autograd runs the later-built half first). So a DPO step holds about as many
    activations as an SFT step on the same batch size, instead of twice as many, for one more forward of half the
    batch (both measured in benchmarks/README.md, section 3). The per-token outputs are the ones a single forward on
    the whole batch gives.
    """

    FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")

    def __init__(self, model):
        self.model = model

    def _forward(self, **inputs) -> tuple:
        outputs = self.model(**inputs)
        return tuple(getattr(outputs, field) for field in self.FIELDS)

    def __call__(self, **inputs) -> FusedCausalLMOutput:
        rows = inputs["input_ids"].shape[0]
        chosen, rejected = ({key: value[half] if torch.is_tensor(value) and value.dim() and value.shape[0] == rows
                             else value for key, value in inputs.items()}
                            for half in (slice(None, rows // 2), slice(rows // 2, None)))
        first = checkpoint(self._forward, use_reentrant=False, **chosen)
        second = self._forward(**rejected)
        return FusedCausalLMOutput(**{field: None if a is None else torch.cat([a, b])
                                      for field, a, b in zip(self.FIELDS, first, second, strict=True)})


class TokenizedDPOTrainer(DPOTrainer):
    """DPO on prompt_ids / chosen_ids / rejected_ids, with the policy's training forward in two half batches
    (_HalfBatches): peak memory near SFT's at the same batch size."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Only the policy's own forward with gradients: the reference and evaluation forwards hold no activations,
        # an MoE router loss would need the whole batch's router logits, and under activation checkpointing the
        # activations are already small.
        if (model.training and torch.is_grad_enabled() and not self.aux_loss_enabled
                and not self.args.activation_checkpointing):
            model = _HalfBatches(model)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


class TokenizedKTOTrainer(KTOTrainer):
    """KTO on prompt_ids / completion_ids / label."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if not self.calculate_KL:
            return dataset

        # KTO's KL term uses mismatched pairs: each batch's completions rotated by one, as TRL builds them.
        def rotate(batch: dict) -> dict:
            return {"KL_completion_ids": batch["completion_ids"][-1:] + batch["completion_ids"][:-1]}

        return dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size,
                           desc=f"Pairing KL completions ({dataset_name})")


class _RowsFromIds:
    """For the trainers (ORPO, CPO/SimPO) that tokenise each row with tokenize_row: build the row from ids."""

    def tokenize_row(self, feature: dict, model=None) -> dict:
        prompt = feature["prompt_ids"]
        row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for side in ("chosen", "rejected"):
            response = feature[f"{side}_ids"]
            ids = (prompt + response)[: self.max_length]
            row[f"{side}_input_ids"] = ids
            row[f"{side}_attention_mask"] = [1] * len(ids)
            row[f"{side}_labels"] = ([IGNORE_INDEX] * len(prompt) + response)[: self.max_length]
        return row


class TokenizedORPOTrainer(_RowsFromIds, ORPOTrainer):
    """ORPO on prompt_ids / chosen_ids / rejected_ids, with the paper's SFT term: the NLL of the chosen answer.

    (TRL's ORPOTrainer also counts the prompt's tokens in that term; every other stage here trains on answers only.)
    """

    def concatenated_forward(self, model, batch: dict) -> tuple:
        outputs = super().concatenated_forward(model, batch)
        chosen_logits = outputs[2]  # already shifted: position t predicts token t + 1
        labels = self.concatenated_inputs(batch, padding_value=self.padding_value,
                                          device=chosen_logits.device)["concatenated_labels"]
        answer_labels = labels[: len(chosen_logits), 1:]
        nll = torch.nn.functional.cross_entropy(chosen_logits.flatten(0, 1), answer_labels.flatten(),
                                                ignore_index=IGNORE_INDEX)
        return (*outputs[:4], nll, *outputs[5:])


class TokenizedCPOTrainer(_RowsFromIds, CPOTrainer):
    """CPO and SimPO on prompt_ids / chosen_ids / rejected_ids."""
