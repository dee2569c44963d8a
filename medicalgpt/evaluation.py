"""Held-out metrics: perplexity, multiple-choice, preference and reward-model accuracy, from answer log-probs."""

import math

import torch
from torch.nn.utils.rnn import pad_sequence


@torch.inference_mode()
def answer_logprobs(model, pairs: list[tuple[list[int], list[int]]], batch_size: int = 8) -> list[tuple[float, int]]:
    """Sum of the log-probabilities of each answer's tokens given its prompt, and the answer's length."""
    results = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start: start + batch_size]
        sequences = [torch.tensor(prompt + answer) for prompt, answer in batch]
        input_ids = pad_sequence(sequences, batch_first=True, padding_value=0).to(model.device)
        attention_mask = pad_sequence([torch.ones_like(s) for s in sequences], batch_first=True).to(model.device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
        token_logps = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None])[..., 0]
        positions = torch.arange(token_logps.shape[1], device=model.device)[None]
        starts = torch.tensor([len(p) - 1 for p, _ in batch], device=model.device)[:, None]
        lengths = torch.tensor([len(a) for _, a in batch], device=model.device)[:, None]
        in_answer = (positions >= starts) & (positions < starts + lengths)
        results += zip((token_logps * in_answer).sum(1).tolist(), lengths[:, 0].tolist(), strict=True)
    return results


def mcq_loglik_accuracy(model, tokenizer, template, records: list[dict], batch_size: int = 8) -> float:
    """Multiple-choice accuracy: the option whose text, as the answer, has the highest mean token log-probability."""
    from medicalgpt.data.processors import prompt_and_response

    pairs, letters = [], []
    for record in records:
        question = [{"role": "user", "content": record["question"]}]
        letters.append(list(record["options"]))
        pairs += [prompt_and_response(tokenizer, template, question, None, text) for text in record["options"].values()]
    scores = iter(answer_logprobs(model, pairs, batch_size))
    correct = 0
    for record, options in zip(records, letters, strict=True):
        means = [total / length for total, length in (next(scores) for _ in options)]
        correct += options[max(range(len(options)), key=means.__getitem__)] == record["answer"]
    return correct / len(records)


def preference_accuracy(model, pairs, batch_size: int = 8, reference=None) -> dict:
    """How often a policy prefers the chosen answer, with the mean margin.

    Without a reference the score is the answer's mean token log-probability (a policy's preference); with one
    (a model, or "adapter" for the policy with its LoRA adapter disabled) it is DPO's implicit reward
    log π(y|x) - log π_ref(y|x).
    """
    def scores(column: str, scorer) -> torch.Tensor:
        results = answer_logprobs(scorer, list(zip(pairs["prompt_ids"], pairs[column], strict=True)), batch_size)
        return torch.tensor([total if reference is not None else total / length for total, length in results])

    def implicit(column: str) -> torch.Tensor:
        if reference is None:
            return scores(column, model)
        if reference == "adapter":
            with model.disable_adapter():
                ref_scores = scores(column, model)
        else:
            ref_scores = scores(column, reference)
        return scores(column, model) - ref_scores

    margin = implicit("chosen_ids") - implicit("rejected_ids")
    return {"accuracy": (margin > 0).float().mean().item(), "margin": margin.mean().item()}


@torch.inference_mode()
def reward_model_accuracy(reward_model, pairs, pad_token_id: int, batch_size: int = 8) -> dict:
    """Pairwise accuracy and mean margin of a reward model on prompt+chosen against prompt+rejected."""
    def rewards(column: str) -> torch.Tensor:
        out = []
        sequences = [torch.tensor(p + a) for p, a in zip(pairs["prompt_ids"], pairs[column], strict=True)]
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start: start + batch_size]
            input_ids = pad_sequence(batch, batch_first=True, padding_value=pad_token_id).to(reward_model.device)
            attention_mask = pad_sequence([torch.ones_like(s) for s in batch], batch_first=True)
            out.append(reward_model(input_ids=input_ids, attention_mask=attention_mask.to(input_ids.device))
                       .logits[:, 0].float().cpu())
        return torch.cat(out)

    margin = rewards("chosen_ids") - rewards("rejected_ids")
    return {"accuracy": (margin > 0).float().mean().item(), "margin": margin.mean().item()}


def perplexity(model, blocks: list[list[int]], batch_size: int = 8) -> float:
    """exp(mean negative log-likelihood over every predicted token), ignoring padding."""
    results = answer_logprobs(model, [(block[:1], block[1:]) for block in blocks], batch_size)
    return math.exp(-sum(total for total, _ in results) / sum(length for _, length in results))
