"""Ask a trained model: one prompt, a file of prompts (batched), or an interactive chat that streams its replies.

The prompt is rendered with the chat template the model was trained with (the adapter's or the model's own
tokenizer template, or --template_name), and generation stops at EOS and the template's end-of-turn tokens.

    python inference.py --base_model outputs-pt --lora_model outputs-sft --prompt "高血压用什么药？"
    python inference.py --lora_model outputs-sft --data_file questions.txt --output_file answers.jsonl
    python inference.py --base_model TEACHER --data_file prompts.jsonl --output_file sft.jsonl --output_format sft
    python inference.py --base_model outputs-merged --interactive --system_prompt "你是一个专业的医疗助手。"

A --data_file holds one prompt per line (.txt) or conversation records (.jsonl/.json: messages, conversations
or instruction); each record is answered at its last user turn, with the turns before it as history. A record
with tools may be answered with tool calls: they come back parsed, as "tool_calls" beside the "response".
"""

from dataclasses import asdict

import medicalgpt.quiet  # noqa: F401  (before the libraries: it filters what they print on import)

from transformers import set_seed

from medicalgpt.answering import (
    GenerationArguments,
    InferenceArguments,
    answer,
    check_batch_args,
    parse_inference_args,
    read_requests,
    with_system,
    write_rows,
)
from medicalgpt.errors import UsageError, run_cli
from medicalgpt.generation import stream_generate
from medicalgpt.reasoning import THINK_CLOSE, THINK_OPEN
from medicalgpt.serving import load_chat_model
from medicalgpt.tool_calls import CallTurn, openai_tool_calls


def check_mode(args: InferenceArguments) -> None:
    """Exactly one of the three modes, with what it needs."""
    modes = [flag for flag, on in (("--prompt", args.prompt is not None), ("--data_file", bool(args.data_file)),
                                   ("--interactive", args.interactive)) if on]
    if len(modes) != 1:
        given = f"; got {' and '.join(modes)}" if modes else ""
        raise UsageError(f"pass exactly one of --prompt, --data_file or --interactive{given}")
    if args.data_file:
        check_batch_args(args)


def as_sft_record(row: dict, system_prompt: str | None) -> dict:
    """An answered request as a conversation in OpenAI-messages form, the answer its last (assistant) turn."""
    messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
    # A teacher's reasoning stays in the answer, so that the student is trained on it too.
    reply = (f"{THINK_OPEN}\n{row['reasoning_content']}\n{THINK_CLOSE}\n\n{row['response']}"
             if row.get("reasoning_content") else row["response"])
    calls = {"tool_calls": openai_tool_calls(CallTurn(row["tool_calls"]))} if row.get("tool_calls") else {}
    record = {"messages": [*with_system(messages, system_prompt), {"role": "assistant", "content": reply, **calls}]}
    return {**record, "tools": row["tools"]} if row.get("tools") else record


def stream_reply(model, tokenizer, prompt: list[int], gen_args: GenerationArguments) -> str:
    """Print the reply while it is generated; returns it whole, or as far as it got when Ctrl-C stopped it."""
    print("Assistant: ", end="", flush=True)
    reply = ""
    try:
        for piece in stream_generate(model, tokenizer, prompt, **asdict(gen_args)):
            piece = piece if reply else piece.lstrip()  # the reply starts at its first visible character
            print(piece, end="", flush=True)
            reply += piece
    except KeyboardInterrupt:  # stream_generate has stopped the generation on its way out
        print(" (stopped)", end="")
    print()
    return reply.strip()


def chat(model, tokenizer, template, args: InferenceArguments, gen_args: GenerationArguments) -> None:
    """A chat on stdin that keeps the conversation so far: `clear` starts over, `exit`, end of input or Ctrl-C at
    the prompt quits; Ctrl-C during a reply stops it."""
    print("Type a message. 'clear' starts a new conversation; 'exit' (or Ctrl-D) quits; Ctrl-C stops a reply.")
    history: list[dict] = []
    while True:
        try:
            text = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if text == "exit":
            break
        if text == "clear":
            history = []
            print("(conversation cleared)")
        elif text:
            history.append({"role": "user", "content": text})
            prompt = template.encode_prompt(tokenizer, with_system(history, args.system_prompt))
            history.append({"role": "assistant", "content": stream_reply(model, tokenizer, prompt, gen_args)})


def main(argv: list[str] | None = None) -> None:
    model_args, args, gen_args = parse_inference_args(argv)
    check_mode(args)
    requests = read_requests(args.data_file) if args.data_file else None  # bad data fails before loading a model
    set_seed(args.seed)
    chat_model = load_chat_model(model_args, args)  # InferenceArguments are AdapterArguments
    model, tokenizer, template = chat_model.model, chat_model.tokenizer, chat_model.template
    if args.prompt is not None:
        print(answer(model, tokenizer, template, [{"prompt": args.prompt}], args, gen_args, False)[0]["response"])
    elif requests:
        rows = answer(model, tokenizer, template, requests, args, gen_args, reasoning=chat_model.reasoning)
        if args.output_format == "sft":
            # An empty answer would be a record no stage accepts: leave it out, and say how many.
            answered = [as_sft_record(row, args.system_prompt) for row in rows
                        if row["response"].strip() or row.get("tool_calls")]
            if len(answered) < len(rows):
                print(f"Left out {len(rows) - len(answered)} of {len(rows)} prompts whose answer was empty")
            rows = answered
        write_rows(rows, args.output_file)
    else:
        chat(model, tokenizer, template, args, gen_args)


if __name__ == "__main__":
    run_cli(main)
