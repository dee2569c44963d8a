"""Synthetic doctor–patient dialogues: two models role-play a consultation through OpenAI-compatible APIs.

The patient model plays a persona (a line of MedicalGPT's seed files, or condition × age × temperament from the
knowledge table) and the doctor model answers it. Each model sees the conversation from its own side: its own
turns as `assistant`, the other's as `user`. Every finished dialogue is appended to the output as one JSON line
(kept) or to its `.rejected` companion (unsafe, duplicate, too short), so a restart skips every persona already
done; an API failure leaves its persona to the next run.
"""

import asyncio
import hashlib
import itertools
import json
import logging
import os
import random
import re
import time
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path

import openai
from tqdm import tqdm

from medicalgpt.data import iter_records
from medicalgpt.errors import DataError, UsageError

logger = logging.getLogger(__name__)

LANGUAGES = ("zh", "en")
# The doctor's first words: the patient model needs a turn to answer, and the output starts with the patient.
OPENERS = {"zh": "您好，请问哪里不舒服？", "en": "Hello, what brings you in today?"}
DOCTOR_PROMPTS = {
    "zh": "你是一位经验丰富、认真负责的医生，正在门诊接诊一位患者。先问清症状、持续时间、病史和用药，再说明可能的诊断、"
          "需要做的检查和治疗建议；药物给出常用剂量和注意事项，病情危急或不确定时建议及时就医。每次回答简洁、通俗、有同理心。"
          "问诊完成时，在回答末尾加上{end_marker}。",
    "en": "You are an experienced, careful doctor seeing a patient in clinic. First ask about the symptoms, their "
          "duration, the history and current medication; then explain the likely diagnosis, the tests needed and the "
          "treatment, with usual doses and precautions, and advise urgent care when the situation is serious or "
          "unclear. Keep each answer short, plain and kind. When the consultation is complete, end your answer with "
          "{end_marker}.",
}
PATIENT_PROMPTS = {
    "zh": "你在扮演下面这位患者，正在门诊看医生。只以患者的身份说话，用口语，每次一到三句，"
          "描述自己的感受、回答医生的问题、提出自己关心的问题；你不知道自己的诊断，不要替医生下结论。"
          "问题都问清楚后，只说{end_marker}。\n\n患者资料：\n{persona}",
    "en": "You are playing the patient described below, seeing a doctor in clinic. Speak only as the patient, in "
          "everyday words, one to three sentences at a time: describe how you feel, answer the doctor's questions and "
          "ask what worries you. You do not know your diagnosis; never make the doctor's conclusions. When all your "
          "questions are answered, say only {end_marker}.\n\nThe patient:\n{persona}",
}
SPEAKER_LABELS = {"zh": ("患者", "医生"), "en": ("Patient", "Doctor")}
SPEAKER_LABEL = {"patient": re.compile(r"^\s*(?:患者|病人|Patient)\s*[:：]\s*", re.IGNORECASE),
                 "doctor": re.compile(r"^\s*(?:医生|护士|Doctor|Nurse)\s*[:：]\s*", re.IGNORECASE)}

# Knowledge-table personas: every condition × age × temperament; sex drawn per persona unless the condition fixes it.
AGES = (23, 36, 49, 62, 75)
TEMPERAMENTS = {
    "anxious": ("焦虑，总担心自己得了重病，同一个问题会反复问", "anxious: fears the worst, asks things twice"),
    "reserved": ("沉默寡言，不主动说症状，要医生追问才说", "reserved: tells symptoms only when asked"),
    "talkative": ("健谈，爱讲生活琐事，容易跑题", "talkative: tells stories about daily life and drifts off topic"),
    "sceptical": ("对医生的建议半信半疑，喜欢自己上网查", "sceptical: doubts advice and quotes what they read online"),
    "cooperative": ("配合治疗，但记性不好，常忘记吃药", "cooperative but forgetful, often misses doses"),
}
SEXES = {"female": ("女", "female"), "male": ("男", "male")}
CONDITION_SEX = {"vulvovaginal_candidiasis": "female", "benign_prostatic_hyperplasia": "male"}
KNOWLEDGE_PERSONA = {
    "zh": "性别：{sex}\n年龄：{age}岁\n最近的不适：{symptoms}\n性格：{temperament}\n"
          "实际病情（只用来让症状前后一致，你并不知道这个诊断）：{name}",
    "en": "Sex: {sex}\nAge: {age}\nRecent complaints: {symptoms}\nTemperament: {temperament}\n"
          "Actual condition (only to keep the symptoms consistent; you do not know this diagnosis): {name}",
}
# First verdict word of the reviewer's answer; letters around it would make it part of another word.
VERDICT = re.compile(r"(?<![A-Z])(UNSAFE|SAFE)(?![A-Z])")


@dataclass
class DialogueArguments:
    base_url: str = field(default="http://127.0.0.1:8000/v1", metadata={
        "help": "The OpenAI-compatible API root (ending in /v1 for most servers) of both roles and the reviewer."})
    model: str = field(default="medicalgpt", metadata={"help": "The model id of both roles and the reviewer."})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={
        "help": "The environment variable holding the API key (never the key itself: `ps` shows command lines)."})
    doctor_base_url: str | None = field(default=None, metadata={"help": "The doctor's API root. Default: --base_url."})
    doctor_model: str | None = field(default=None, metadata={"help": "The doctor's model. Default: --model."})
    doctor_api_key_env: str | None = field(default=None, metadata={"help": "Default: --api_key_env."})
    patient_base_url: str | None = field(default=None, metadata={
        "help": "The patient's API root. Default: --base_url."})
    patient_model: str | None = field(default=None, metadata={"help": "The patient's model. Default: --model."})
    patient_api_key_env: str | None = field(default=None, metadata={"help": "Default: --api_key_env."})
    reviewer_prompt_file: str | None = field(default=None, metadata={
        "help": "Review every dialogue with this system prompt; the reviewer answers SAFE or UNSAFE and UNSAFE (or no "
                "verdict) drops the dialogue. Default: no review. Example: configs/dialogue_reviewer_prompt.txt."})
    reviewer_base_url: str | None = field(default=None, metadata={"help": "Default: --base_url."})
    reviewer_model: str | None = field(default=None, metadata={"help": "Default: --model."})
    reviewer_api_key_env: str | None = field(default=None, metadata={"help": "Default: --api_key_env."})
    personas: str | None = field(default=None, metadata={
        "help": "Patient personas, one JSON object a line with a `system_prompt` describing the patient (MedicalGPT's "
                "role_play_data/seed_patient_role.jsonl as it is; an `id` field is optional). Default: personas "
                "from the knowledge table (condition × age × temperament)."})
    num_dialogues: int | None = field(default=None, metadata={
        "help": "Personas to use (the first N). Default: every persona of --personas, or 40 from the knowledge table."})
    language: str = field(default="zh", metadata={
        "help": "Language of the built-in prompts and knowledge-table personas.", "choices": list(LANGUAGES)})
    doctor_prompt_file: str | None = field(default=None, metadata={
        "help": "The doctor's system prompt: a text file, or a .jsonl of clinician personas in the seed format (e.g. "
                "MedicalGPT's seed_nurse_role.jsonl), one drawn per dialogue. Default: a built-in prompt that asks "
                "for --end_marker."})
    num_turns: int = field(default=6, metadata={"help": "Most patient-doctor exchanges per dialogue."})
    min_turns: int = field(default=1, metadata={"help": "Dialogues with fewer exchanges are rejected as too short."})
    end_marker: str = field(default="[END]", metadata={
        "help": "Either side ends the dialogue by saying it; empty or repeated replies end it too."})
    max_tokens: int = field(default=512, metadata={"help": "max_tokens of every reply."})
    temperature: float = field(default=0.8, metadata={"help": "Sampling temperature of both roles (reviewer: 0)."})
    top_p: float | None = field(default=None, metadata={"help": "Nucleus sampling; default: the server's."})
    seed: int = field(default=42, metadata={
        "help": "Orders the knowledge-table personas; also sent as the request seed, for servers that honour it."})
    concurrency: int = field(default=8, metadata={"help": "Dialogues in flight at once."})
    max_retries: int = field(default=5, metadata={
        "help": "Retries of a request on 429, 5xx, timeouts and dropped connections (exponential backoff, or the "
                "server's Retry-After)."})
    timeout: float = field(default=120.0, metadata={"help": "Seconds one request may take."})
    output_file: str = field(default="outputs-dialogues/dialogues.jsonl", metadata={
        "help": "JSON lines, appended to (a rerun resumes). Beside it: .rejected (dropped dialogues, JSON lines) and "
                ".summary (this run's counts, JSON); suffixes the stages never read as data."})
    output_format: str = field(default="sharegpt", metadata={
        "help": "sharegpt: conversations of human/gpt turns; openai: messages of user/assistant turns.",
        "choices": ["sharegpt", "openai"]})

    def __post_init__(self):
        if self.num_turns < 1 or not 1 <= self.min_turns <= self.num_turns:
            raise ValueError("--num_turns must be >= 1 and --min_turns between 1 and --num_turns")
        if self.concurrency < 1 or self.max_retries < 0 or (self.num_dialogues is not None and self.num_dialogues < 1):
            raise ValueError("--concurrency and --num_dialogues must be >= 1, --max_retries >= 0")
        if not self.end_marker.strip():
            raise ValueError("--end_marker must not be blank")


@dataclass(frozen=True)
class Persona:
    id: str
    system_prompt: str  # the patient, as the seed file describes them


def content_id(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_personas(path: str, flag: str = "personas") -> list[Persona]:
    """Personas of a seed file (one {"system_prompt": ...} a line); without an `id` a persona is named by its text,
    so reordering or extending the file keeps the names a resumed run matches on."""
    if not Path(path).is_file():
        raise UsageError(f"--{flag} {path}: no such file")
    personas: dict[str, Persona] = {}
    for where, record in iter_records(Path(path)):
        prompt = record.get("system_prompt") if isinstance(record, dict) else None
        if isinstance(record, DataError) or not isinstance(prompt, str) or not prompt.strip():
            problem = record if isinstance(record, DataError) else 'expected {"system_prompt": "<the persona>"}'
            raise DataError(f"{where}: {problem} (one persona a line, MedicalGPT's seed format)")
        persona = Persona(str(record.get("id") or content_id(prompt.strip())), prompt.strip())
        personas.setdefault(persona.id, persona)  # a line repeated in the file is one persona
    if not personas:
        raise UsageError(f"--{flag} {path}: no personas in the file")
    return list(personas.values())


def knowledge_personas(count: int, language: str, seed: int) -> list[Persona]:
    """count patients of the knowledge table's conditions, every one a distinct condition × age × temperament.
    The order is fixed by the seed and the first count are taken, so a larger count extends a smaller one."""
    from data.knowledge import CONDITIONS  # the sample data's table; read only for this

    combinations = list(itertools.product(CONDITIONS, AGES, TEMPERAMENTS))
    if count > len(combinations):
        raise UsageError(f"--num_dialogues {count}: the knowledge table gives {len(combinations)} distinct personas; "
                         "pass --personas FILE for more")
    random.Random(seed).shuffle(combinations)
    lang = LANGUAGES.index(language)
    personas = []
    for condition, age, temperament in combinations[:count]:
        sex = CONDITION_SEX.get(condition["id"]) or random.Random(f"{seed}-{condition['id']}-{age}").choice(
            sorted(SEXES))
        symptoms = ("、" if language == "zh" else ", ").join(condition[f"symptoms_{language}"])
        text = KNOWLEDGE_PERSONA[language].format(sex=SEXES[sex][lang], age=age, symptoms=symptoms,
                                                  temperament=TEMPERAMENTS[temperament][lang],
                                                  name=condition[f"name_{language}"])
        personas.append(Persona(f"{language}-{condition['id']}-{sex}-{age}-{temperament}", text))
    return personas


def read_prompt(path: str, flag: str) -> str:
    """A system prompt kept in a text file."""
    if not Path(path).is_file():
        raise UsageError(f"--{flag} {path}: no such file")
    text = Path(path).read_text(encoding="utf-8").strip()
    if not text:
        raise UsageError(f"--{flag} {path}: the file is empty")
    return text


class MalformedResponse(Exception):
    """A 200 answer that is not a chat completion (the client parses without checking, and never retries it)."""


@dataclass
class RoleCounts:
    """One role's requests and tokens in this run (tokens as the API's `usage` reports them)."""

    base_url: str
    model: str
    requests: int = 0
    retries: int = 0  # attempts the client repeated after a 429, 5xx, timeout or dropped connection
    failed_requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    truncated_replies: int = 0  # finish_reason "length": the reply was cut at --max_tokens


@dataclass
class Speaker:
    """One role's model behind an OpenAI-compatible endpoint."""

    role: str
    model: str
    api_key_env: str
    client: openai.AsyncOpenAI
    sampling: dict
    counts: RoleCounts

    @property
    def base_url(self) -> str:
        return self.counts.base_url

    async def say(self, messages: list[dict]) -> str:
        """The model's reply (stripped; "" for none). The client retries 429/5xx/connection errors itself."""
        counts = self.counts
        try:
            raw = await self.client.chat.completions.with_raw_response.create(
                model=self.model, messages=messages, **self.sampling)
        except openai.APIError as error:
            counts.failed_requests += 1
            if isinstance(error, openai.NotFoundError):
                raise UsageError(f"{self.base_url} answered 404 to a chat request ({error.message}): check --"
                                 f"{self.role}_model or --model ({self.model!r})") from None
            # A refused key, or a server still unreachable after every retry, would fail every other dialogue too.
            if isinstance(error, openai.AuthenticationError | openai.PermissionDeniedError | openai.APIConnectionError):
                raise UsageError(f"{endpoint_problem(self, error)}; then rerun the same command to resume") from None
            raise
        counts.requests += 1
        counts.retries += raw.retries_taken
        try:
            completion = raw.parse()
            choice = completion.choices[0]
            text = choice.message.content or ""
        except (ValueError, LookupError, AttributeError, TypeError) as error:
            raise MalformedResponse(f"{self.base_url} answered with a malformed chat completion "
                                    f"({type(error).__name__}: {error})") from error
        if completion.usage:
            counts.prompt_tokens += completion.usage.prompt_tokens or 0
            counts.completion_tokens += completion.usage.completion_tokens or 0
        counts.truncated_replies += choice.finish_reason == "length"
        return text.strip()


def make_speaker(role: str, base_url: str, model: str, api_key_env: str, args: DialogueArguments,
                 sampling: dict) -> Speaker:
    api_key = os.environ.get(api_key_env)
    if not api_key:
        raise UsageError(f"set ${api_key_env} to the API key of {base_url} (any non-empty value for a server "
                         f"without keys), or name another variable with --api_key_env or --{role}_api_key_env")
    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=args.max_retries,
                                timeout=args.timeout)
    return Speaker(role, model, api_key_env, client, sampling, RoleCounts(base_url, model))


def build_speakers(args: DialogueArguments) -> dict[str, Speaker]:
    """The doctor, the patient and (with --reviewer_prompt_file) the reviewer, each on its endpoint."""
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed}
    if args.top_p is not None:
        sampling["top_p"] = args.top_p
    roles = {"doctor": sampling, "patient": sampling}
    if args.reviewer_prompt_file:
        roles["reviewer"] = {**sampling, "temperature": 0.0}  # a verdict, not a creative answer
    return {role: make_speaker(role, getattr(args, f"{role}_base_url") or args.base_url,
                               getattr(args, f"{role}_model") or args.model,
                               getattr(args, f"{role}_api_key_env") or args.api_key_env, args, role_sampling)
            for role, role_sampling in roles.items()}


def endpoint_problem(speaker: Speaker, error: openai.APIError) -> str:
    """One line saying what is wrong with an endpoint and which flag or variable fixes it."""
    flags = f"--{speaker.role}_base_url or --base_url"
    if isinstance(error, openai.AuthenticationError | openai.PermissionDeniedError):
        return (f"{speaker.base_url} refused the API key in ${speaker.api_key_env} ({error.status_code}): set it to a "
                "valid key")
    if isinstance(error, openai.NotFoundError):
        return (f"{speaker.base_url}/models does not exist (404): {flags} must be the API root, for most servers "
                "ending in /v1")
    if isinstance(error, openai.APIConnectionError):
        return f"cannot reach {speaker.base_url} ({error.__cause__ or error}): check {flags} and that the server runs"
    return f"{speaker.base_url} answered {getattr(error, 'status_code', '')}: {error}"


async def check_endpoints(speakers: dict[str, Speaker]) -> None:
    """Fail before any generation when an endpoint is unreachable, has no API there, or refuses the key."""
    for speaker in speakers.values():
        try:
            models = await speaker.client.with_options(max_retries=0, timeout=30).models.list()
        except openai.APIError as error:
            raise UsageError(endpoint_problem(speaker, error)) from None
        served = [m.id for m in models.data]
        if served and speaker.model not in served:  # some providers list only part of what they serve: warn only
            logger.warning("%s does not list the %s model %r (it lists %s)", speaker.base_url, speaker.role,
                           speaker.model, ", ".join(served[:10]))


def doctor_prompts(args: DialogueArguments) -> list[str]:
    """The doctor's system prompts: the built-in one, a text file's, or the personas of a seed file."""
    if not args.doctor_prompt_file:
        return [DOCTOR_PROMPTS[args.language].format(end_marker=args.end_marker)]
    if args.doctor_prompt_file.endswith((".jsonl", ".json")):
        return [p.system_prompt for p in read_personas(args.doctor_prompt_file, "doctor_prompt_file")]
    return [read_prompt(args.doctor_prompt_file, "doctor_prompt_file")]


def doctor_for(persona: Persona, prompts: list[str]) -> str:
    """The persona's doctor, the same in every run (a resumed persona meets the doctor it would have met)."""
    return prompts[int(content_id(persona.id), 16) % len(prompts)]


def clean_reply(text: str, role: str, end_marker: str) -> tuple[str, bool]:
    """The reply without a leading speaker label (role-playing models often write one) and without the end marker
    and what follows it; and whether the marker was there."""
    before, found, _ = SPEAKER_LABEL[role].sub("", text, count=1).partition(end_marker)
    return before.strip(), bool(found)


def normalized(text: str) -> str:
    """Text compared for repeats and duplicates: width, case and whitespace do not count."""
    return "".join(unicodedata.normalize("NFKC", text).casefold().split())


def content_hash(turns: list[str]) -> str:
    return hashlib.sha256("\x1f".join(normalized(t) for t in turns).encode()).hexdigest()


async def role_play(persona: Persona, doctor: Speaker, patient: Speaker, doctor_prompt: str,
                    args: DialogueArguments) -> list[str]:
    """The dialogue's turns, patient first, ending with the doctor. It stops after --num_turns exchanges, when
    either side says the end marker (the doctor's last words are kept, the patient's closing words are not), or
    when a reply is empty or repeats that side's earlier words (that exchange is dropped)."""
    patient_prompt = PATIENT_PROMPTS[args.language].format(persona=persona.system_prompt, end_marker=args.end_marker)
    patient_view = [{"role": "system", "content": patient_prompt}, {"role": "user", "content": OPENERS[args.language]}]
    doctor_view = [{"role": "system", "content": doctor_prompt}]
    turns: list[str] = []
    for _ in range(args.num_turns):
        question, patient_done = clean_reply(await patient.say(patient_view), "patient", args.end_marker)
        if patient_done or not question or normalized(question) in map(normalized, turns[0::2]):
            break
        patient_view.append({"role": "assistant", "content": question})
        doctor_view.append({"role": "user", "content": question})
        answer, doctor_done = clean_reply(await doctor.say(doctor_view), "doctor", args.end_marker)
        if not answer or normalized(answer) in map(normalized, turns[1::2]):
            break
        turns += [question, answer]
        if doctor_done:
            break
        patient_view.append({"role": "user", "content": answer})
        doctor_view.append({"role": "assistant", "content": answer})
    return turns


async def review(reviewer: Speaker, prompt: str, turns: list[str], language: str) -> str | None:
    """None when the reviewer calls the dialogue SAFE; otherwise why it is dropped."""
    labels = SPEAKER_LABELS[language]
    transcript = "\n".join(f"{labels[i % 2]}: {turn}" for i, turn in enumerate(turns))
    answer = await reviewer.say([{"role": "system", "content": prompt}, {"role": "user", "content": transcript}])
    verdict = VERDICT.search(answer.upper())
    if verdict is None:
        return "no_verdict"
    return None if verdict.group(1) == "SAFE" else "unsafe"


def to_record(persona: Persona, turns: list[str], output_format: str) -> dict:
    if output_format == "sharegpt":
        conversation = {"conversations": [{"from": ("human", "gpt")[i % 2], "value": t} for i, t in enumerate(turns)]}
    else:
        conversation = {"messages": [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]}
    # "persona", not "system_prompt": the stages would read that as the conversation's system turn.
    return {"id": persona.id, **conversation, "persona": persona.system_prompt}


def record_turns(record: dict) -> list[str]:
    """The turns' texts of a record written in either output format."""
    if "conversations" in record:
        return [turn["value"] for turn in record["conversations"]]
    return [message["content"] for message in record["messages"]]


def read_jsonl_for_resume(path: Path) -> list[dict]:
    """The records of an output file written line by line; an unfinished last line (a run killed mid-write) is
    cut off the file, and its dialogue is generated again."""
    if not path.exists():
        return []
    data = path.read_bytes()
    complete, newline, unfinished = data.rpartition(b"\n")
    if unfinished:
        logger.warning("%s: removed an unfinished last line (%d bytes) left by an interrupted run; that persona is "
                       "generated again", path, len(unfinished))
        with path.open("r+b") as f:
            f.truncate(len(complete) + len(newline))
    records = []
    for number, line in enumerate(complete.decode("utf-8").splitlines(), start=1):
        try:
            record = json.loads(line)
            if not (isinstance(record, dict) and "id" in record and {"conversations", "messages"} & set(record)):
                raise ValueError("no id and conversations or messages")
            records.append(record)
        except ValueError as error:
            raise DataError(f"{path}:{number}: not a dialogue this tool wrote ({error}); use another --output_file or "
                            "remove that line") from None
    return records


class DialogueStore:
    """The output file and its .rejected companion: read back on start (the personas done, the kept dialogues'
    content hashes) and appended one flushed line per dialogue."""

    def __init__(self, output_file: str, output_format: str):
        self.kept_path = Path(output_file)
        self.rejected_path = self.kept_path.with_suffix(".rejected")
        self.summary_path = self.kept_path.with_suffix(".summary")
        self.output_format = output_format
        self.kept_path.parent.mkdir(parents=True, exist_ok=True)
        kept = read_jsonl_for_resume(self.kept_path)
        self.done = {record["id"] for record in kept + read_jsonl_for_resume(self.rejected_path)}
        self.hashes = {content_hash(record_turns(record)) for record in kept}
        self.kept = len(kept)

    def save(self, persona: Persona, turns: list[str], rejected_because: str | None) -> str | None:
        """Append the dialogue (kept unless it was rejected or repeats a kept one); the reason it was not kept."""
        digest = content_hash(turns)
        if rejected_because is None and digest in self.hashes:
            rejected_because = "duplicate"
        record = to_record(persona, turns, self.output_format)
        if rejected_because:
            record["rejected"] = rejected_because
        else:
            self.hashes.add(digest)
            self.kept += 1
        with (self.rejected_path if rejected_because else self.kept_path).open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.done.add(persona.id)
        return rejected_because


@dataclass
class RunSummary:
    """What one run did; written as JSON to the output's .summary companion."""

    output_file: str
    personas: int
    already_done: int
    kept: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> dialogues
    failed: int = 0  # personas left for the next run (an API error after the client's retries)
    last_error: str | None = None
    roles: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0


async def generate(personas: list[Persona], speakers: dict[str, Speaker], store: DialogueStore,
                   args: DialogueArguments, doctor_prompts: list[str], reviewer_prompt: str | None) -> RunSummary:
    """Role-play every persona not yet in the store, --concurrency at a time, with a progress bar."""
    todo = [p for p in personas if p.id not in store.done]
    summary = RunSummary(str(store.kept_path), len(personas), len(personas) - len(todo))
    started, semaphore, fatal = time.monotonic(), asyncio.Semaphore(args.concurrency), []
    progress = tqdm(total=len(todo), desc="dialogues", unit="dialogue")

    async def one(persona: Persona) -> None:
        async with semaphore:
            if fatal:
                return
            try:
                turns = await role_play(persona, speakers["doctor"], speakers["patient"],
                                        doctor_for(persona, doctor_prompts), args)
                reason = "too_short" if len(turns) < 2 * args.min_turns else None
                if reason is None and reviewer_prompt:
                    reason = await review(speakers["reviewer"], reviewer_prompt, turns, args.language)
            except UsageError as error:  # from say(): an endpoint problem that stops the run
                fatal.append(str(error))
                return
            except (openai.APIError, MalformedResponse) as error:
                summary.failed += 1
                summary.last_error = f"{type(error).__name__}: {error}"
                return
            finally:
                progress.update(1)
            reason = store.save(persona, turns, reason)
            if reason:
                summary.rejected[reason] = summary.rejected.get(reason, 0) + 1
            else:
                summary.kept += 1
            progress.set_postfix(kept=store.kept, tokens=sum(s.counts.prompt_tokens + s.counts.completion_tokens
                                                             for s in speakers.values()))

    try:
        await asyncio.gather(*(one(p) for p in todo))
    finally:  # also when interrupted: the counts of the requests made so far
        progress.close()
        summary.roles = {role: asdict(speaker.counts) for role, speaker in speakers.items()}
        summary.seconds = round(time.monotonic() - started, 1)
        store.summary_path.write_text(json.dumps(asdict(summary), indent=2, ensure_ascii=False) + "\n")
    if fatal:
        raise UsageError(fatal[0])
    return summary
