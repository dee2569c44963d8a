"""Synthetic SFT data: a doctor model and a patient model role-play consultations through any OpenAI-compatible API
(GPT-4o, Doubao, MiniMax, vLLM, our openai_api.py), one dialogue per patient persona, written as ShareGPT (or
OpenAI-messages) JSON lines that validate_data.py accepts and supervised_finetuning.py trains on.

    export OPENAI_API_KEY=sk-...        # the key never goes on the command line
    python generate_dialogues.py --base_url https://api.openai.com/v1 --model gpt-4o \
        --personas role_play_data/seed_patient_role.jsonl --output_file outputs-dialogues/dialogues.jsonl
    python validate_data.py outputs-dialogues/dialogues.jsonl --stage sft

Rerunning the same command resumes: personas already written (kept or rejected) are skipped.
"""

import asyncio
import logging

from medicalgpt.args import parse_args
from medicalgpt.errors import run_cli
from medicalgpt.synthesis import (
    DialogueArguments,
    DialogueStore,
    RunSummary,
    build_speakers,
    check_endpoints,
    doctor_prompts,
    generate,
    knowledge_personas,
    read_personas,
    read_prompt,
)

logger = logging.getLogger(__name__)


async def run(args: DialogueArguments) -> RunSummary:
    personas = (read_personas(args.personas) if args.personas
                else knowledge_personas(args.num_dialogues or 40, args.language, args.seed))[:args.num_dialogues]
    doctors = doctor_prompts(args)
    reviewer_prompt = (read_prompt(args.reviewer_prompt_file, "reviewer_prompt_file") if args.reviewer_prompt_file
                       else None)
    speakers = build_speakers(args)
    try:
        await check_endpoints(speakers)
        store = DialogueStore(args.output_file, args.output_format)
        return await generate(personas, speakers, store, args, doctors, reviewer_prompt)
    finally:
        for speaker in speakers.values():
            await speaker.client.close()


def main(argv: list[str] | None = None) -> RunSummary:
    (args,) = parse_args((DialogueArguments,), argv)
    summary = asyncio.run(run(args))
    rejected = ", ".join(f"{n} {reason}" for reason, n in summary.rejected.items()) or "none"
    requests = sum(role["requests"] for role in summary.roles.values())
    tokens = sum(role["prompt_tokens"] + role["completion_tokens"] for role in summary.roles.values())
    logger.info("%s: %d dialogues kept, rejected: %s; %d personas were already done; %d requests, %d tokens, %.1f s",
                summary.output_file, summary.kept, rejected, summary.already_done, requests, tokens, summary.seconds)
    if summary.failed:
        logger.warning("%d personas failed (last error: %s): run the same command again to generate them",
                       summary.failed, summary.last_error)
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    for name in ("httpx", "httpx2"):  # their line per request would bury the progress bar
        logging.getLogger(name).setLevel(logging.WARNING)
    run_cli(main)
