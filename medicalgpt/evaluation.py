"""Held-out metrics: perplexity, multiple-choice, preference and reward-model accuracy, from answer log-probs;
the KL of a distilled student from its teacher; in-context copying."""

import math
from collections.abc import Iterator

import torch
from torch.nn.utils.rnn import pad_sequence


def answer_batches(pairs: list[tuple[list[int], list[int]]], batch_size: int, device) -> Iterator[tuple]:
    """Right-padded prompt + answer batches: input ids, attention mask, where each answer's tokens are predicted
    (position t predicts token t + 1) and the answers' lengths."""
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start: start + batch_size]
        sequences = [torch.tensor(prompt + answer) for prompt, answer in batch]
        input_ids = pad_sequence(sequences, batch_first=True, padding_value=0).to(device)
        attention_mask = pad_sequence([torch.ones_like(s) for s in sequences], batch_first=True).to(device)
        positions = torch.arange(input_ids.shape[1] - 1, device=device)[None]
        starts = torch.tensor([len(p) - 1 for p, _ in batch], device=device)[:, None]
        lengths = torch.tensor([len(a) for _, a in batch], device=device)[:, None]
        yield input_ids, attention_mask, (positions >= starts) & (positions < starts + lengths), lengths[:, 0]


def next_token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Log-probabilities over the vocabulary of each next token, in float32."""
    logits = model(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device)).logits
    return torch.log_softmax(logits[:, :-1].float(), -1).to(input_ids.device)


@torch.inference_mode()
def answer_logprobs(model, pairs: list[tuple[list[int], list[int]]], batch_size: int = 8) -> list[tuple[float, int]]:
    """Sum of the log-probabilities of each answer's tokens given its prompt, and the answer's length."""
    results = []
    for input_ids, attention_mask, in_answer, lengths in answer_batches(pairs, batch_size, model.device):
        logps = next_token_logprobs(model, input_ids, attention_mask)
        token_logps = logps.gather(-1, input_ids[:, 1:, None])[..., 0]
        results += zip((token_logps * in_answer).sum(1).tolist(), lengths.tolist(), strict=True)
    return results


@torch.inference_mode()
def teacher_kl(student, teacher, pairs: list[tuple[list[int], list[int]]], batch_size: int = 8) -> float:
    """Mean KL(teacher ‖ student) of the next-token distributions over the answers' tokens: how far the student is
    from predicting what the teacher predicts (0 when they agree). Both must share one vocabulary."""
    total, tokens = 0.0, 0
    for input_ids, attention_mask, in_answer, _ in answer_batches(pairs, batch_size, student.device):
        student_logps = next_token_logprobs(student, input_ids, attention_mask)
        teacher_logps = next_token_logprobs(teacher, input_ids, attention_mask)
        kl = (teacher_logps.exp() * (teacher_logps - student_logps)).sum(-1)
        total += kl[in_answer].sum().item()
        tokens += in_answer.sum().item()
    return total / tokens


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

    Without a reference the score is the answer's mean token log-probability (accuracy, margin: a longer answer
    is not penalised for its length), and from the same pass its summed log-probability (summed_accuracy,
    summed_margin: the sequence's probability, which DPO raises); with a reference (a model, or "adapter" for the
    policy with its LoRA adapter disabled) it is DPO's implicit reward log π(y|x) - log π_ref(y|x), summed.
    """
    def logprobs(column: str, scorer) -> torch.Tensor:
        """Each answer's (summed log-probability, token count)."""
        pairs_of_column = list(zip(pairs["prompt_ids"], pairs[column], strict=True))
        return torch.tensor(answer_logprobs(scorer, pairs_of_column, batch_size), dtype=torch.float64)

    def summary(margin: torch.Tensor, prefix: str = "") -> dict:
        return {f"{prefix}accuracy": (margin > 0).float().mean().item(), f"{prefix}margin": margin.mean().item()}

    if reference is None:
        chosen, rejected = logprobs("chosen_ids", model), logprobs("rejected_ids", model)
        per_token = chosen[:, 0] / chosen[:, 1] - rejected[:, 0] / rejected[:, 1]
        return {**summary(per_token), **summary(chosen[:, 0] - rejected[:, 0], "summed_")}

    def implicit(column: str) -> torch.Tensor:
        if reference == "adapter":
            with model.disable_adapter():
                ref_scores = logprobs(column, model)[:, 0]
        else:
            ref_scores = logprobs(column, reference)[:, 0]
        return logprobs(column, model)[:, 0] - ref_scores

    return summary(implicit("chosen_ids") - implicit("rejected_ids"))


@torch.inference_mode()
def reward_scores(reward_model, sequences: list[list[int]], pad_token_id: int, batch_size: int = 8) -> torch.Tensor:
    """A reward model's score of each token sequence (prompt + answer), read where it reads it: the last non-pad
    token of the right-padded batch."""
    out = []
    for start in range(0, len(sequences), batch_size):
        batch = [torch.tensor(s) for s in sequences[start: start + batch_size]]
        input_ids = pad_sequence(batch, batch_first=True, padding_value=pad_token_id).to(reward_model.device)
        attention_mask = pad_sequence([torch.ones_like(s) for s in batch], batch_first=True)
        out.append(reward_model(input_ids=input_ids, attention_mask=attention_mask.to(input_ids.device))
                   .logits[:, 0].float().cpu())
    return torch.cat(out)


def reward_model_accuracy(reward_model, pairs, pad_token_id: int, batch_size: int = 8) -> dict:
    """Pairwise accuracy and mean margin of a reward model on prompt+chosen against prompt+rejected."""
    def rewards(column: str) -> torch.Tensor:
        sequences = [p + a for p, a in zip(pairs["prompt_ids"], pairs[column], strict=True)]
        return reward_scores(reward_model, sequences, pad_token_id, batch_size)

    margin = rewards("chosen_ids") - rewards("rejected_ids")
    return {"accuracy": (margin > 0).float().mean().item(), "margin": margin.mean().item()}


def perplexity(model, blocks: list[list[int]], batch_size: int = 8) -> float:
    """exp(mean negative log-likelihood over every predicted token), ignoring padding."""
    results = answer_logprobs(model, [(block[:1], block[1:]) for block in blocks], batch_size)
    return math.exp(-sum(total for total, _ in results) / sum(length for _, length in results))


def copy_accuracy(model, token_ids: list[int], lengths: tuple[int, ...] = (8, 24, 48), strings: int = 32,
                  seed: int = 0) -> float:
    """In-context copying: random strings of token_ids, each followed by itself; the share of the repeat's tokens
    (after its first) that the model predicts greedily, over all lengths.

    Tool-call arguments and answers grounded in retrieved text copy words out of the prompt: a model near 0 here
    gets them wrong however much it is fine-tuned on them (docs/tool-calling.md).
    """
    generator = torch.Generator().manual_seed(seed)
    pool = torch.tensor(token_ids)
    right = total = 0
    for length in lengths:
        string = pool[torch.randint(len(pool), (strings, length), generator=generator)]
        input_ids = torch.cat([string, string], dim=1).to(model.device)
        with torch.no_grad():
            # The logits at the repeat's k-th token (k >= 0) predict its (k+1)-th.
            predicted = model(input_ids=input_ids).logits[:, length:-1].argmax(-1)
        right += (predicted == input_ids[:, length + 1:]).sum().item()
        total += predicted.numel()
    return right / total
