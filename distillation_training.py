"""On-policy distillation: a student answers its own prompts and learns the teacher's next-token distributions.

For each prompt (the conversations of an SFT file, up to their last user turn) the student samples an answer
(--max_completion_length tokens at --temperature); the loss is the generalised Jensen-Shannon divergence between
the student's and the frozen teacher's distributions on that answer, token by token (--beta: 0 = forward KL,
0.5 = JSD, 1 = reverse KL, TRL's default). TRL's DistillationTrainer does the sampling and the loss; the student
trains with LoRA/QLoRA (default) or in full, and the teacher can load in 4/8-bit. Teacher and student must share a
tokenizer: otherwise use offline distillation (teacher answers from inference.py, then plain SFT; README).

    python distillation_training.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --teacher_model_name_or_path outputs-sft-merged --train_file_dir data/sft/train --output_dir outputs-distill
"""

from dataclasses import dataclass, field, replace
from pathlib import Path

import medicalgpt.quiet  # noqa: F401  (before the libraries: it filters what they print on import)

from trl import DistillationConfig, DistillationTrainer

from medicalgpt.args import ChatDataArguments, LoraArguments, ModelArguments, parse_args
from medicalgpt.data.formats import to_prompt
from medicalgpt.errors import UsageError, run_cli
from medicalgpt.modeling import apply_lora, check_model_args, load_model, load_tokenizer, set_stop_tokens
from medicalgpt.training import STAGE_DEFAULTS, load_chat_inputs, prepare_run, train_and_save


@dataclass
class TeacherArguments:
    teacher_load_in_4bit: bool = field(default=False, metadata={"help": "Load the teacher in 4-bit (bitsandbytes)."})
    teacher_load_in_8bit: bool = field(default=False, metadata={"help": "Load the teacher in 8-bit (bitsandbytes)."})


def to_distillation_prompt(record: object) -> dict:
    """A conversation (ShareGPT, OpenAI messages, Alpaca) as the prompt the student answers: up to its last user
    turn."""
    return {"prompt": to_prompt(record)["messages"]}


def teacher_model_args(model_args: ModelArguments, training_args: DistillationConfig,
                       teacher_args: TeacherArguments) -> ModelArguments:
    if not training_args.teacher_model_name_or_path:
        raise UsageError("--teacher_model_name_or_path is required: the model whose distributions the student learns")
    teacher = replace(model_args, model_name_or_path=training_args.teacher_model_name_or_path,
                      tokenizer_name_or_path=None, load_in_4bit=teacher_args.teacher_load_in_4bit,
                      load_in_8bit=teacher_args.teacher_load_in_8bit)
    check_model_args(teacher)
    return teacher


def check_same_tokenizer(student_tokenizer, teacher_args: ModelArguments) -> None:
    """The loss compares distributions id by id, so both models must number the same tokens the same way."""
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), load_tokenizer(teacher_args).get_vocab()
    if student_vocab != teacher_vocab:
        differing = len(set(student_vocab.items()) ^ set(teacher_vocab.items()))
        raise UsageError(f"the teacher's tokenizer differs from the student's ({len(teacher_vocab)} vs "
                         f"{len(student_vocab)} tokens, {differing} entries differ): on-policy distillation needs one "
                         "vocabulary; pick a teacher of the student's family, or distil offline (README: Distillation)")


def main(argv: list[str] | None = None) -> dict:
    model_args, lora_args, data_args, teacher_args, training_args = parse_args(
        (ModelArguments, LoraArguments, ChatDataArguments, TeacherArguments, DistillationConfig), argv,
        defaults=STAGE_DEFAULTS,
        config=Path(__file__).with_name("configs") / "distill.yaml")
    check_model_args(model_args, lora_args)
    teacher_args = teacher_model_args(model_args, training_args, teacher_args)
    resume = prepare_run(training_args)

    splits, tokenizer, template = load_chat_inputs(model_args, data_args, training_args, to_distillation_prompt)
    check_same_tokenizer(tokenizer, teacher_args)
    student = apply_lora(load_model(model_args), lora_args, training_args)
    set_stop_tokens(student, tokenizer, template.stop_words)  # an answer ends at the template's end of turn
    teacher = load_model(teacher_args).eval().requires_grad_(False)

    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=training_args, processing_class=tokenizer,
                                  train_dataset=splits["train"], eval_dataset=splits.get("validation"))
    return train_and_save(trainer, resume)


if __name__ == "__main__":
    run_cli(main)
