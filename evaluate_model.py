"""Evaluate a model on held-out data; each run appends one row to a results table.

Metrics (each from its own flag):
- perplexity on text (--perplexity_files), token-level;
- multiple-choice accuracy (--mcq_file: question / options / answer, the shape of MedQA, CMExam, CMB):
  by option log-likelihood (--mcq_mode loglik) and/or by generating and parsing a letter (generate);
- preference accuracy on chosen/rejected pairs (--preference_file): the policy's preference by mean token
  log-probability (preference_accuracy, length-normalised) and by summed log-probability
  (preference_accuracy_summed), plus DPO's implicit reward against the reference (--implicit_reward); or a reward
  model's pairwise accuracy and margin (--reward_model);
- a reward model's mean score of the model's greedy answers to held-out questions (--reward_file, with
  --reward_model), beside its mean score of their reference answers (the ceiling) and the answers' mean length;
- answer accuracy on questions with verifiable answers (--answer_file, GRPO's format), generated and scored
  with the reward functions (--reward_funcs);
- sample answers to held-out conversations (--questions_file), printed beside the references;
- tool-call accuracy on tool-calling conversations (--tool_file): the model answers each first question with the
  conversation's tools; right when it calls the expected tool with exactly the expected arguments (parsed JSON
  equality), or makes no call where the reference answers without one (tool_call_accuracy), and when it picks the
  right tool, or none (tool_choice_accuracy);
- in-context copying (--copy_accuracy): random token strings, each shown twice; the share of the second copy the
  model predicts (tool arguments and grounded answers are copied out of the prompt);
- a distilled student's distance from its teacher (--teacher_model): the mean per-token KL(teacher || student)
  on the reference answers of held-out conversations (--kl_file);
- retrieval over a document index (--rag_index, built by rag.py): recall@1 and @k of each question's source document
  (--rag_questions: question / answer / source), and answer accuracy with and without the retrieved chunks.

Each run appends {"name", "metrics", "samples"} to --results_file (JSON lines) and prints the table of all rows:

    python evaluate_model.py --name pt --model_name_or_path outputs-pt --perplexity_files data/pretrain/validation \
        --mcq_file data/eval/mcq_validation.jsonl --results_file results.jsonl
"""

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from medicalgpt.args import DataArguments, ModelArguments, parse_args
from medicalgpt.data import (
    build_preference_splits,
    build_pretraining_splits,
    load_splits,
    to_conversation,
    to_grpo,
    to_preference,
    to_text,
)
from medicalgpt.data.loading import LoadReport, convert_records
from medicalgpt.data.processors import prompt_and_response
from medicalgpt.data.readers import find_data_files, iter_records
from medicalgpt.errors import DataError, UsageError, run_cli
from medicalgpt.evaluation import (
    copy_accuracy,
    mcq_loglik_accuracy,
    perplexity,
    preference_accuracy,
    reward_model_accuracy,
    reward_scores,
    teacher_kl,
)
from medicalgpt.generation import generate
from medicalgpt.modeling import (
    load_for_inference,
    load_model,
    load_reward_model,
    load_tokenizer,
    set_stop_tokens,
    with_adapter_base,
)
from medicalgpt.rag.grounding import grounded_messages, uncited
from medicalgpt.rag.index import RagArguments, RagIndex
from medicalgpt.report import markdown
from medicalgpt.rewards import choice_accuracy, load_reward_functions, reward_funcs_field
from medicalgpt.serving import AdapterArguments
from medicalgpt.templates import resolve_template
from medicalgpt.tool_calls import first_decision, score_tool_calls


@dataclass
class EvalArguments(AdapterArguments):
    name: str = field(default="model", metadata={"help": "Row label in the results table."})
    perplexity_files: str | None = field(default=None, metadata={"help": "Text files/dirs for perplexity."})
    block_size: int = field(default=256, metadata={"help": "Tokens per perplexity window."})
    mcq_file: str | None = field(default=None, metadata={
        "help": "Multiple-choice questions (question/options/answer)."})
    mcq_mode: str = field(default="loglik", metadata={"choices": ["loglik", "generate", "both"], "help": (
        "loglik: the option whose text is most likely as the answer; generate: the letter in a generated answer.")})
    preference_file: str | None = field(default=None, metadata={"help": "Held-out chosen/rejected pairs."})
    implicit_reward: bool = field(default=False, metadata={"help": (
        "Also score pairs by DPO's implicit reward against the reference: the model without its LoRA adapter, or "
        "--ref_model.")})
    ref_model: str | None = field(default=None, metadata={"help": "Reference model for --implicit_reward."})
    reward_model: str | None = field(default=None, metadata={
        "help": "Score --preference_file's pairs with this reward model instead, and --reward_file's answers."})
    reward_file: str | None = field(default=None, metadata={"help": (
        "Held-out conversations: --reward_model scores the model's greedy answer to each last user turn "
        "(heldout_reward, answer_tokens) and the reference answer (reference_reward).")})
    answer_file: str | None = field(default=None, metadata={"help": "Questions with verifiable answers (GRPO format)."})
    reward_funcs: str = reward_funcs_field("answer_accuracy", "scored on --answer_file")
    questions_file: str | None = field(default=None, metadata={
        "help": "Conversation files/dirs: the model answers each last user turn; the reference is printed beside."})
    num_questions: int = field(default=5, metadata={"help": "Sample answers to print from --questions_file."})
    tool_file: str | None = field(default=None, metadata={
        "help": "Tool-calling conversations (with tools): tool-call accuracy of the model's first reply."})
    copy_accuracy: bool = field(default=False, metadata={"help": (
        "In-context copying: how much of a random token string the model repeats after seeing it once (tool "
        "arguments and grounded answers need it).")})
    teacher_model: str | None = field(default=None, metadata={
        "help": "Report the KL of this teacher's next-token distributions from the model's (distillation)."})
    kl_file: str = field(default="data/sft/validation", metadata={
        "help": "Conversations whose reference answers --teacher_model's KL is measured on."})
    rag_questions: str = field(default="data/rag/questions.jsonl", metadata={
        "help": "With --rag_index: questions (question / answer / source document) the documents answer."})
    max_new_tokens: int = field(default=64)
    batch_size: int = field(default=8)
    results_file: str | None = field(default=None, metadata={"help": "Append the metrics row here (JSON lines)."})


def _splits(files: str, convert):
    """The records of these files as the single split "train" (no validation split is held out)."""
    return load_splits(DataArguments(train_file_dir=files, validation_split_percentage=0), convert)


def _records(files: str, convert):
    return _splits(files, convert)["train"]


def text_perplexity(model, tokenizer, files: str, block_size: int, batch_size: int) -> float:
    splits = build_pretraining_splits(_splits(files, to_text), tokenizer, block_size)
    return perplexity(model, splits["train"]["input_ids"], batch_size)


def checked_mcq(record: object) -> dict:
    """A multiple-choice record: a question, options {letter: text} and the answer's letter."""
    if not isinstance(record, dict) or not isinstance(record.get("question"), str):
        raise DataError("question: missing")
    options = record.get("options")
    if not isinstance(options, dict) or len(options) < 2 or not all(isinstance(t, str) for t in options.values()):
        raise DataError("options: expected an object of at least two letter: text entries")
    if record.get("answer") not in options:
        raise DataError(f"answer: expected one of the option letters {', '.join(options)}")
    return record


def mcq_records(path: str) -> list[dict]:
    """Multiple-choice records as they are (options stay a mapping of letter to text)."""
    return [record for file in find_data_files(path)
            for record in convert_records(iter_records(file), checked_mcq, LoadReport(), skip_bad_records=False,
                                            skip_flag=None)]


def mcq_generate_accuracy(model, tokenizer, template, records: list[dict], args: EvalArguments) -> float:
    """Generate an answer to each question (options listed) and parse the chosen letter from it."""
    questions = [to_grpo(record) for record in records]
    prompts = [template.encode_prompt(tokenizer, q["prompt"]) for q in questions]
    answers = generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    scores = choice_accuracy(completions=[[{"role": "assistant", "content": a}] for a in answers],
                             answer=[q["answer"] for q in questions])
    return sum(score or 0.0 for score in scores) / len(records)


def answer_accuracy(model, tokenizer, template, args: EvalArguments, prompts: list[list[dict]] | None = None,
                    references: list[str] | None = None) -> float:
    """Mean reward of generated answers to questions with verifiable answers (--answer_file's, or those given; their
    citations of sources, [1], are not part of the answer)."""
    if prompts is None:
        questions = _records(args.answer_file, to_grpo)
        prompts, references = questions["prompt"], questions["answer"]
    answers = generate(model, tokenizer, [template.encode_prompt(tokenizer, p) for p in prompts],
                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    answers = [uncited(answer) for answer in answers]
    completions = [[{"role": "assistant", "content": a}] for a in answers]
    totals = [0.0] * len(answers)
    for fn in load_reward_functions(args.reward_funcs.split(",")):
        scores = fn(completions=completions, prompts=prompts, answer=references)
        totals = [t + (s or 0.0) for t, s in zip(totals, scores, strict=True)]
    return sum(totals) / len(totals)


def rag_question(record: object) -> dict:
    """A question answered by one document: to_grpo's prompt and answer, and the document's name in the index."""
    if not isinstance(record, dict) or not isinstance(record.get("source"), str):
        raise DataError("source: missing (the name of the document that answers the question)")
    return {**to_grpo(record), "source": record["source"]}


def rag_metrics(model, tokenizer, template, args: EvalArguments, rag_args: RagArguments) -> dict:
    """How often the top 1 and top k retrieved chunks include the question's source document, and answer accuracy
    with and without them in the prompt."""
    index = RagIndex(rag_args.rag_index, rag_args.reranker_model)
    questions = [record for file in find_data_files(args.rag_questions) for record in convert_records(
        iter_records(file), rag_question, LoadReport(), skip_bad_records=False, skip_flag=None)]
    k = rag_args.rag_top_k
    hits = [index.search(q["prompt"][-1]["content"], k, rag_args.retrieval) for q in questions]
    found = [[hit.file for hit in question_hits] for question_hits in hits]
    references = [q["answer"] for q in questions]
    return {
        "rag_recall@1": sum(q["source"] in files[:1] for q, files in zip(questions, found)) / len(questions),
        f"rag_recall@{k}": sum(q["source"] in files for q, files in zip(questions, found)) / len(questions),
        "answer_accuracy_no_rag": answer_accuracy(model, tokenizer, template, args, [q["prompt"] for q in questions],
                                                  references),
        "answer_accuracy_rag": answer_accuracy(model, tokenizer, template, args, [
            grounded_messages(q["prompt"], question_hits) for q, question_hits in zip(questions, hits)], references),
    }


def preference_metrics(model, model_args, tokenizer, template, args: EvalArguments) -> dict:
    pairs = build_preference_splits(_splits(args.preference_file, to_preference), tokenizer, template)["train"]
    if args.reward_model:
        reward_model = load_reward_model(args.reward_model, model_args)
        return {f"rm_{k}": v for k, v in reward_model_accuracy(reward_model, pairs, tokenizer.pad_token_id).items()}
    policy = preference_accuracy(model, pairs, args.batch_size)
    metrics = {"preference_accuracy": policy["accuracy"], "preference_accuracy_summed": policy["summed_accuracy"]}
    if args.implicit_reward:
        reference = load_model(replace(model_args, model_name_or_path=args.ref_model)).eval() \
            if args.ref_model else "adapter"
        result = preference_accuracy(model, pairs, args.batch_size, reference)
        metrics.update(implicit_reward_accuracy=result["accuracy"], implicit_reward_margin=result["margin"])
    return metrics


def held_out_reward(model, model_args, tokenizer, template, args: EvalArguments) -> dict:
    """The reward model's mean score of the model's greedy answers to --reward_file's questions and of their
    reference answers (where a policy that answered like the references would be), and the answers' mean length in
    tokens (a policy that games the reward model with short answers shows there)."""
    conversations = _records(args.reward_file, to_conversation)
    prompts = [c["messages"][:-1] for c in conversations]
    answers = generate(model, tokenizer, [template.encode_prompt(tokenizer, p) for p in prompts],
                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    reward_model = load_reward_model(args.reward_model, model_args)

    def mean_score(responses: list[str]) -> float:  # each answer rendered as the reward model learnt answers
        sequences = [prompt_ids + answer_ids for prompt_ids, answer_ids in (
            prompt_and_response(tokenizer, template, prompt, None, response)
            for prompt, response in zip(prompts, responses, strict=True))]
        return reward_scores(reward_model, sequences, tokenizer.pad_token_id, args.batch_size).mean().item()

    lengths = [len(tokenizer(answer, add_special_tokens=False)["input_ids"]) for answer in answers]
    return {"heldout_reward": mean_score(answers),
            "reference_reward": mean_score([c["messages"][-1]["content"] for c in conversations]),
            "answer_tokens": sum(lengths) / len(lengths)}


def sample_answers(model, tokenizer, template, args: EvalArguments) -> list[dict]:
    conversations = _records(args.questions_file, to_conversation)
    conversations = conversations.select(range(min(args.num_questions, len(conversations))))
    prompts = [template.encode_prompt(tokenizer, c["messages"][:-1]) for c in conversations]
    answers = generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    return [{"question": c["messages"][-2]["content"], "reference": c["messages"][-1]["content"], "answer": a}
            for c, a in zip(conversations, answers, strict=True)]


def tool_accuracy(model, tokenizer, template, args: EvalArguments) -> dict:
    """Tool-call accuracy of the first reply to each conversation of --tool_file (see score_tool_calls)."""
    conversations = _records(args.tool_file, to_conversation)
    cases = [(*first_decision(c["messages"]), json.loads(c["tools"]) if c["tools"] else None) for c in conversations]
    prompts = [template.encode_prompt(tokenizer, prompt, tools) for prompt, _, tools in cases]
    replies = generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    return score_tool_calls([call for _, call, _ in cases], replies, template.tools_format)


def distance_from_teacher(model, model_args, tokenizer, template, args: EvalArguments) -> float:
    """Mean per-token KL(teacher || model) on the reference answers of --kl_file's conversations."""
    teacher = load_model(replace(model_args, model_name_or_path=args.teacher_model)).eval()
    pairs = [prompt_and_response(tokenizer, template, c["messages"][:-1], None, c["messages"][-1]["content"])
             for c in _records(args.kl_file, to_conversation)]
    return teacher_kl(model, teacher, pairs, args.batch_size)


def evaluate_model(model_args: ModelArguments, args: EvalArguments, rag_args: RagArguments | None = None) -> dict:
    """Every requested metric of one model, and its sample answers."""
    if args.reward_file and not args.reward_model:
        raise UsageError("--reward_file's answers are scored by a reward model: pass --reward_model too")
    model_args = with_adapter_base(model_args, args.lora_model)
    tokenizer = load_tokenizer(model_args, args.lora_model)
    template = resolve_template(tokenizer, args.template_name, tool_format=args.tool_format)
    model = load_for_inference(model_args, args.lora_model)
    set_stop_tokens(model, tokenizer, template.stop_words)
    metrics, samples = {}, []
    if args.perplexity_files:
        metrics["perplexity"] = text_perplexity(model, tokenizer, args.perplexity_files, args.block_size,
                                                args.batch_size)
    if args.mcq_file:
        records = mcq_records(args.mcq_file)
        if args.mcq_mode in ("loglik", "both"):
            metrics["mcq_accuracy"] = mcq_loglik_accuracy(model, tokenizer, template, records, args.batch_size)
        if args.mcq_mode in ("generate", "both"):
            metrics["mcq_generate_accuracy"] = mcq_generate_accuracy(model, tokenizer, template, records, args)
    if args.preference_file:
        metrics.update(preference_metrics(model, model_args, tokenizer, template, args))
    if args.reward_file:
        metrics.update(held_out_reward(model, model_args, tokenizer, template, args))
    if args.answer_file:
        metrics["answer_accuracy"] = answer_accuracy(model, tokenizer, template, args)
    if args.tool_file:
        metrics.update(tool_accuracy(model, tokenizer, template, args))
    if args.copy_accuracy:
        added = set(tokenizer.get_added_vocab().values())  # special and control tokens: never in a user's text
        metrics["copy_accuracy"] = copy_accuracy(model, [i for i in range(len(tokenizer)) if i not in added])
    if args.teacher_model:
        metrics["teacher_kl"] = distance_from_teacher(model, model_args, tokenizer, template, args)
    if rag_args and rag_args.rag_index:
        metrics.update(rag_metrics(model, tokenizer, template, args, rag_args))
    if args.questions_file:
        samples = sample_answers(model, tokenizer, template, args)
    return {"name": args.name, "metrics": metrics, "samples": samples}


def main(argv: list[str] | None = None) -> dict:
    model_args, args, rag_args = parse_args((ModelArguments, EvalArguments, RagArguments), argv)
    row = evaluate_model(model_args, args, rag_args)
    for sample in row["samples"]:
        print(f"Q: {sample['question']}\n   reference: {sample['reference']}\n   {args.name}: {sample['answer']}")
    rows = [row]
    if args.results_file:
        path = Path(args.results_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    print(markdown(rows))
    return row


if __name__ == "__main__":
    run_cli(main)
