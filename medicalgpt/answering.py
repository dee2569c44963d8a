"""Answering prompts in batches: the flags and helpers that inference.py and inference_multigpu.py share (and the
benchmarks, which read the same request files)."""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medicalgpt.args import parse_args
from medicalgpt.data.formats import detect_format, to_prompt, to_text
from medicalgpt.data.loading import LoadReport, convert_records
from medicalgpt.data.readers import find_data_files, iter_records
from medicalgpt.errors import UsageError
from medicalgpt.generation import generate
from medicalgpt.reasoning import split_reasoning
from medicalgpt.serving import AdapterArguments, BaseModelArguments


@dataclass
class InferenceArguments(AdapterArguments):
    system_prompt: str | None = field(default=None, metadata={
        "help": "System prompt for conversations that do not bring their own."})
    prompt: str | None = field(default=None, metadata={"help": "Mode 1: answer this prompt and print the answer."})
    data_file: str | None = field(default=None, metadata={
        "help": "Mode 2: answer every prompt of these .txt/.jsonl/.json files (comma-separated) in batches."})
    output_file: str | None = field(default=None, metadata={
        "help": "With --data_file: write the answers here as JSON lines, in input order."})
    output_format: str = field(default="answers", metadata={"choices": ["answers", "sft"], "help": (
        "answers: each request with its \"response\"; sft: each conversation ending with the answer as the "
        "assistant's turn, an SFT file (offline distillation: a teacher's answers to train a student on).")})
    interactive: bool = field(default=False, metadata={"help": "Mode 3: chat on stdin, streaming each reply."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per left-padded batch (--data_file)."})
    seed: int = field(default=42, metadata={"help": "Random seed, for reproducible sampling."})


@dataclass
class GenerationArguments:
    """The keyword arguments of medicalgpt.generation.generate / stream_generate."""

    max_new_tokens: int = field(default=256, metadata={"help": "Most tokens to generate per answer."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature; 0 = greedy decoding."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling: keep the smallest set of tokens with "
                                                        "this total probability."})
    top_k: int = field(default=0, metadata={"help": "Sample among the k most likely tokens; 0 = no limit."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Above 1 discourages repeating tokens."})


def parse_inference_args(argv: list[str] | None) -> tuple[BaseModelArguments, InferenceArguments,
                                                          GenerationArguments]:
    model_args, args, gen_args = parse_args((BaseModelArguments, InferenceArguments, GenerationArguments), argv)
    check_generation_args(gen_args)
    return model_args, args, gen_args


def check_generation_args(gen_args: GenerationArguments) -> None:
    """Values generate() would refuse with a traceback, or (a negative temperature) silently read as greedy."""
    for flag, value, valid, expected in [
        ("max_new_tokens", gen_args.max_new_tokens, gen_args.max_new_tokens >= 1, "at least 1"),
        ("temperature", gen_args.temperature, gen_args.temperature >= 0, "0 (greedy) or more"),
        ("top_p", gen_args.top_p, 0 < gen_args.top_p <= 1, "in (0, 1]"),
        ("top_k", gen_args.top_k, gen_args.top_k >= 0, "0 (no limit) or more"),
        ("repetition_penalty", gen_args.repetition_penalty, gen_args.repetition_penalty > 0, "above 0"),
    ]:
        if not valid:
            raise UsageError(f"--{flag} {value}: must be {expected}")


def check_batch_args(args: InferenceArguments) -> None:
    if not args.output_file:
        raise UsageError("--data_file needs --output_file (where the answers go, as JSON lines)")
    if args.batch_size < 1:
        raise UsageError(f"--batch_size {args.batch_size}: must be at least 1")


def _request(record: object) -> dict:
    """A .txt line is one prompt; a conversation record is answered at its last user turn."""
    if detect_format(record) == "text":
        return {"prompt": to_text(record)["text"]}
    return to_prompt(record)


def read_requests(data_file: str) -> list[dict]:
    """Every prompt of the data files, in order; a malformed record stops with its file and line."""
    requests = [request for path in find_data_files(data_file)
                for request in convert_records(iter_records(path), _request, LoadReport(), skip_bad_records=False,
                                                skip_flag=None)]
    if not requests:
        raise UsageError(f"--data_file {data_file}: no prompts in it")
    return requests


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """The conversation with --system_prompt in front, unless it brings its own."""
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def encode_request(tokenizer, template, request: dict, system_prompt: str | None) -> list[int]:
    messages = request.get("messages") or [{"role": "user", "content": request["prompt"]}]
    tools = json.loads(request["tools"]) if request.get("tools") else None
    return template.encode_prompt(tokenizer, with_system(messages, system_prompt), tools)


def answer(model, tokenizer, template, requests: list[dict], args: InferenceArguments,
           gen_args: GenerationArguments, show_progress: bool = True, reasoning: bool = False) -> list[dict]:
    """Each request (its non-empty fields) with its "response", in input order; a reasoning model's think block
    goes to "reasoning_content", and the calls of a request with tools to "tool_calls" ({"name", "arguments"})."""
    prompts = [encode_request(tokenizer, template, request, args.system_prompt) for request in requests]
    responses = generate(model, tokenizer, prompts, batch_size=args.batch_size, show_progress=show_progress,
                         **asdict(gen_args))
    rows = []
    for request, response in zip(requests, responses, strict=True):
        thought, response = split_reasoning(response) if reasoning else (None, response)
        call = template.tools_format.parse(response) if request.get("tools") else None
        rows.append({**{k: v for k, v in request.items() if v}, "response": call.text if call else response,
                     **({"reasoning_content": thought} if thought is not None else {}),
                     **({"tool_calls": call.calls} if call else {})})
    return rows


def write_rows(rows: list[dict], output_file: str) -> None:
    path = Path(output_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    print(f"Wrote {len(rows)} answers to {path}")
