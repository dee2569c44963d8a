"""TRL's preference trainers, fed with our token ids.

Every stage renders conversations with the same token-level chat template (medicalgpt.templates), so
these subclasses only skip each trainer's own tokenization of text; losses, reference models, logging
and checkpointing stay TRL's.
"""

import torch
from trl import DPOTrainer, KTOTrainer
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer

from medicalgpt.templates import IGNORE_INDEX


class TokenizedDPOTrainer(DPOTrainer):
    """DPO on prompt_ids / chosen_ids / rejected_ids."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


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
