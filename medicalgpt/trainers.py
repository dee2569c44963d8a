"""TRL's preference trainers, fed with our token ids.

Every stage renders conversations with the same token-level chat template (medicalgpt.templates), so
these subclasses only skip each trainer's own tokenization of text; losses, reference models, logging
and checkpointing stay TRL's.
"""

import functools
import types

import torch
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel, Trainer
from trl import DPOTrainer, KTOTrainer, SFTTrainer
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer
from trl.trainer.utils import FusedCausalLMOutput

from medicalgpt.templates import IGNORE_INDEX

# Config fields by which TRL's fused head rescales or caps the logits (its add_fused_lm_head): the compact head
# below does neither, so a model that sets one keeps TRL's head.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                    "logits_scaling")


def add_compact_lm_head(model: PreTrainedModel) -> None:
    """Replace TRL's fused LM head on `model` (the CPU path): with fused_lm_head=True, only the labelled positions
    are scored, in one product with the head, with TRL's FusedCausalLMOutput fields (log_probs with gradient; entropy,
    mean_logits and is_top1 for the logs, without, and only unless logged_outputs=False).

    Off a Triton device, TRL's head scores every position (prompt and padding too) in Python-looped vocabulary tiles
    and recomputes them in backward; here the loss-bearing tokens (a third of a batch in SFT and DPO on our data)
    are scored once, and their logits kept for backward (CPU memory is rarely what limits). Calls without
    fused_lm_head run the model's own forward.
    """
    own_forward = type(model).forward

    @functools.wraps(own_forward)
    def forward(self, *args, fused_lm_head=False, labels=None, num_items_in_batch=None, logged_outputs=True,
                **kwargs):
        if not fused_lm_head:
            extra = {k: v for k, v in (("labels", labels), ("num_items_in_batch", num_items_in_batch)) if v is not None}
            return own_forward(self, *args, **extra, **kwargs)
        hidden = self.base_model(*args, **{**kwargs, "use_cache": False}).last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        mask = targets != IGNORE_INDEX
        logits = self.get_output_embeddings()(hidden[mask])
        log_p = logits.log_softmax(-1)  # one fused pass forward and one backward over (tokens, vocabulary)
        log_probs = log_p.gather(-1, targets[mask][:, None])[:, 0]
        entropy = mean_logits = is_top1 = None
        if logged_outputs:
            with torch.no_grad():
                entropy = -(log_p.exp() * log_p).sum(-1)
                mean_logits, is_top1 = logits.mean(-1), logits.argmax(-1) == targets[mask]
        log_probs, entropy, mean_logits, is_top1 = (
            None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x)
            for x in (log_probs, entropy, mean_logits, is_top1))
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs, entropy=entropy,
                                   mean_logits=mean_logits, is_top1=is_top1, label_mask=mask)

    model.forward = types.MethodType(forward, model)


def use_compact_lm_head(trainer, *models) -> bool:
    """On a CPU, give `models` (the trainer's policy and reference) the compact head instead of TRL's fused one;
    whether it did. MoE models (their router loss) and models whose config rescales or caps the logits keep TRL's."""
    config = trainer.model.config.get_text_config()
    if (trainer.accelerator.device.type != "cpu" or trainer.aux_loss_enabled
            or any(getattr(config, name, None) for name in LOGIT_TRANSFORMS)):
        return False
    for model in models:
        if model is not None:
            add_compact_lm_head(model.get_base_model() if hasattr(model, "get_base_model") else model)
    return True


class CPUFriendlySFTTrainer(SFTTrainer):
    """TRL's SFTTrainer, with the compact LM head on a CPU (use_compact_lm_head), and there training steps compute
    the loss alone: TRL's logs entropy and token accuracy every step, which over the vocabulary cost about as much
    as the loss (6% of a step on MedicalGPT's SFT sample). Evaluation keeps them, and MoE models keep TRL's path."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.compact_head = use_compact_lm_head(self, self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not (self.compact_head and model.training):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return Trainer.compute_loss(self, model, {**inputs, "fused_lm_head": True, "logged_outputs": False},
                                    return_outputs, num_items_in_batch)


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
    """DPO on prompt_ids / chosen_ids / rejected_ids; with half_batches, the policy's training forward runs in two
    half batches (_HalfBatches): peak memory near SFT's at the same batch size, for one more half-batch forward."""

    def __init__(self, *args, half_batches: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.half_batches = half_batches
        if not self.use_weighting:  # WPO weights need log_sum_sq_probs, which only TRL's head computes
            use_compact_lm_head(self, self.model, self.ref_model)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Only the policy's own forward with gradients: the reference and evaluation forwards hold no activations,
        # an MoE router loss would need the whole batch's router logits, and under activation checkpointing the
        # activations are already small.
        if (self.half_batches and model.training and torch.is_grad_enabled() and not self.aux_loss_enabled
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
