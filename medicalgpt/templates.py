"""Chat templates rendered straight to token ids and loss labels.

Each built-in Template renders a conversation segment by segment (prefix, system, user turns, assistant turns)
and tokenises the segments separately, so the loss mask comes from token ids rather than from diffing rendered
strings. Its hand-written HF chat template (chat_templates/<name>.jinja) renders the same text, with
{% generation %} markers around the trained spans, for inference and for the tests that cross-check both.
"""

import itertools
import re
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import jinja2

from medicalgpt.errors import DataError, UsageError
from medicalgpt.tool_calls import ToolFormat, get_tool_format, read_call_turn, read_results, to_openai_messages

IGNORE_INDEX = -100
CHAT_TEMPLATE_DIR = Path(__file__).parent / "chat_templates"
GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
USER_SIDE = ("user", "observation")
ASSISTANT_SIDE = ("assistant", "function_call")

# Tools go into the system text for families without a native tool format.
DEFAULT_TOOLS = (
    "# Tools\n\nYou can call the following functions. To call one, reply with a JSON object holding its name "
    "and arguments.\n{content}"
)
_QWEN_TOOLS_HEAD = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{content}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags"
)
CHATML_TOOLS = _QWEN_TOOLS_HEAD + "."
QWEN_TOOLS = (
    _QWEN_TOOLS_HEAD + ':\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)
# GLM-4's own system block for tools ({content}: each tool's "## name" section), before any system prompt.
GLM4_TOOLS = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
              "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具{content}")


def _fill(fmt: str, content: str) -> str:
    """fmt with its {content} placeholder replaced (str.format would trip on the JSON braces in tool texts)."""
    return fmt.replace("{content}", content)


@cache
def _read_jinja(name: str) -> str:
    """The hand-written chat template chat_templates/<name>.jinja."""
    return (CHAT_TEMPLATE_DIR / f"{name}.jinja").read_text(encoding="utf-8")


# Special-token strings in message content stand in as these code points (Supplementary Private Use Area-B)
# while the conversation is rendered, and become plain text again when it is tokenised.
_PLACEHOLDER_BASE = 0x100000


def _special_tokens(tokenizer) -> tuple[list[str], re.Pattern]:
    """The tokenizer's special-token strings and a pattern finding them (the longest first; never matches if none)."""
    specials = [token.content for token in tokenizer.added_tokens_decoder.values() if token.special]
    return specials, re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True))) or "(?!)")


def _escape_content(tokenizer, messages: list[dict]) -> list[dict]:
    """The messages with each special-token string in their content replaced by its placeholder."""
    specials, pattern = _special_tokens(tokenizer)
    placeholder = {special: chr(_PLACEHOLDER_BASE + i) for i, special in enumerate(specials)}
    return [{**m, "content": pattern.sub(lambda match: placeholder[match.group()], m["content"])}
            if isinstance(m.get("content"), str) else m for m in messages]


def holds_special_tokens(tokenizer, messages: list[dict]) -> bool:
    """Whether a message's content holds a special-token string of the tokenizer."""
    return _escape_content(tokenizer, messages) != messages


def encode_rendered(tokenizer, text: str) -> list[int]:
    """Ids of rendered text whose special-token strings are control tokens while placeholders (escaped content)
    become the plain text they stand for. Without placeholders this equals tokenizer.encode(text), which also
    tokenises the text between special tokens separately. Quiet about text longer than the tokenizer's
    model_max_length: every caller measures the length itself and reports or fits over-long samples."""
    specials, pattern = _special_tokens(tokenizer)
    plain = {_PLACEHOLDER_BASE + i: special for i, special in enumerate(specials)}
    ids, start = [], 0
    for match in [*pattern.finditer(text), None]:
        between = text[start: match.start() if match else len(text)].translate(plain)
        if between:
            ids += tokenizer.encode(between, add_special_tokens=False, split_special_tokens=True, verbose=False)
        if match:
            ids.append(tokenizer.convert_tokens_to_ids(match.group()))
            start = match.end()
    return ids


def _with_think_block(content: str, after_last_user: bool, last: bool) -> str:
    """A reply as Qwen3's template renders it: after the last user turn, the reasoning (a <think> block in the
    content) in a think block on each reply that has some and on the last (empty if it has none); before it,
    the answer alone."""
    reasoning, answer = "", content
    if "</think>" in content:
        reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
        answer = content.split("</think>")[-1].lstrip("\n")
    if after_last_user and (last or reasoning):
        return "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + answer.lstrip("\n")
    return answer


def _labelled(ids: list[int], trained: bool) -> list[int]:
    """ids as labels when trained, else IGNORE_INDEX for each."""
    return list(ids) if trained else [IGNORE_INDEX] * len(ids)


@dataclass(frozen=True)
class Template:
    """A chat prompt format; each format string has a {content} placeholder."""

    name: str
    prefix: str = ""  # written once at the start, e.g. a literal BOS token
    system: str = "{content}"
    user: str = "{content}"
    assistant_prefix: str = ""  # untrained role header, also the generation prompt
    assistant: str = "{content}"  # trained: content + end-of-turn token
    assistant_suffix: str = ""  # untrained text after the end-of-turn token
    function_call: str | None = None  # trained like assistant; None: the assistant format
    observation: str | None = None  # None: the user format
    tool_format: str = "json"  # how calls and tool results are written (medicalgpt.tool_calls.TOOL_FORMATS)
    tools: str = DEFAULT_TOOLS  # {content}: the tool definitions as the tool format writes them
    # Where the tools text goes: "system" (appended to the system text), "system_block" (a system turn of its
    # own before the system prompt: GLM-4), "last_user" (before the last user turn: Mistral v3).
    tools_placement: str = "system"
    default_system: str | None = None
    merge_system: str = ""  # "first"/"last": the system text opens the first (llama2, mistral) / last user turn
    stop_words: tuple[str, ...] = ()
    # False: special-token strings in message content are plain text, so a message cannot forge a turn.
    allow_special_tokens: bool = False
    # Qwen3-style reasoning: the reply after the last user turn carries a <think> block (empty when it brings no
    # reasoning), earlier replies lose theirs.
    think_blocks: bool = False
    prompt_suffix: str = ""  # after assistant_prefix in a generation prompt only (thinking off: an empty block)

    @property
    def jinja(self) -> str:
        """The HF chat template rendering the same text, with {% generation %} around trained spans."""
        return _read_jinja(self.name)

    def encode(
        self, tokenizer, messages: list[dict], tools: list[dict] | None = None, train_on_inputs: bool = False
    ) -> tuple[list[int], list[int]]:
        """input_ids and labels (-100 on tokens that carry no loss)."""
        ids, labels = [], []
        # Adjacent segments with the same label are joined first, so only train/no-train edges split the text.
        for trained, group in itertools.groupby(self._segments(tokenizer, messages, tools), key=lambda s: s[1]):
            segment_ids = encode_rendered(tokenizer, "".join(text for text, _ in group))
            ids += segment_ids
            labels += _labelled(segment_ids, trained or train_on_inputs)
        return ids, labels

    def encode_prompt(self, tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """ids of a conversation ending in a user/observation turn plus the assistant generation prompt."""
        if messages[-1]["role"] not in USER_SIDE:
            raise UsageError(f"a prompt must end in a user or observation turn, not {messages[-1]['role']!r}")
        text = "".join(text for text, _ in self._segments(tokenizer, messages, tools))
        return encode_rendered(tokenizer, text + self.assistant_prefix + self.prompt_suffix)

    def _tools_text(self, tools: list[dict] | None) -> str | None:
        return _fill(self.tools, self.tools_format.render_tools(tools)) if tools else None

    def _system_text(self, messages: list[dict], tools: list[dict] | None) -> str | None:
        """The system prompt (given or default), with the tool descriptions appended where they go there; None
        when there is none."""
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else self.default_system
        if tools and self.tools_placement == "system":
            tool_text = self._tools_text(tools)
            system = f"{system}\n\n{tool_text}" if system else tool_text
        return system

    def _segments(self, tokenizer, messages: list[dict], tools: list[dict] | None) -> list[tuple[str, bool]]:
        """(text, trained) pieces of the rendered conversation, in order."""
        if not self.allow_special_tokens:
            messages = _escape_content(tokenizer, messages)
        system = self._system_text(messages, tools)
        segments = [(self.prefix, False)]
        if tools and self.tools_placement == "system_block":
            segments.append((_fill(self.system, self._tools_text(tools)), False))
        if system is not None and not self.merge_system:
            segments.append((_fill(self.system, system), False))
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        last_user = users[-1] if users else -1
        merge_into = (users[0] if self.merge_system == "first" else last_user) if self.merge_system and users else -1
        calls = results = 0  # before each turn: formats that write call ids count them
        for index, message in enumerate(messages):
            if index == 0 and message["role"] == "system":
                continue
            content = message["content"]
            if index == merge_into and system is not None:
                content = _fill(self.system, system) + content
            if index == last_user and tools and self.tools_placement == "last_user":
                segments.append((self._tools_text(tools), False))
            if self.think_blocks and message["role"] == "assistant":
                content = _with_think_block(content, index > last_user, index == len(messages) - 1)
            segments += self._turn(message["role"], content, calls if message["role"] == "function_call" else results)
            if message["role"] == "function_call":
                calls += len(read_call_turn(content).calls)
            elif message["role"] == "observation":
                results += len(read_results(content))
        return segments

    @property
    def tools_format(self) -> ToolFormat:
        return get_tool_format(self.tool_format)

    def _turn(self, role: str, content: str, first_id: int = 0) -> list[tuple[str, bool]]:
        """(text, trained) pieces of one turn; first_id: the calls (or results) before it in the conversation."""
        if role == "function_call":
            content = self.tools_format.render_calls(content, first_id)
        elif role == "observation":
            content = self.tools_format.render_results(content, first_id)
        if role in USER_SIDE:
            fmt = self.user if role == "user" else self.observation or self.user
            return [(_fill(fmt, content), False)]
        if role in ASSISTANT_SIDE:
            fmt = self.assistant if role == "assistant" else self.function_call or self.assistant
            return [(self.assistant_prefix, False), (_fill(fmt, content), True), (self.assistant_suffix, False)]
        raise UsageError(f"unknown role {role!r}: expected system (first), {', '.join(USER_SIDE + ASSISTANT_SIDE)}")


@dataclass(frozen=True)
class TokenizerChatTemplate:
    """A tokenizer's own chat template; its assistant mask comes from its {% generation %} markers."""

    jinja: str
    stop_words: tuple[str, ...] = ()
    name: str = "tokenizer"
    allow_special_tokens: bool = False  # as in Template
    template_kwargs: dict | None = None  # extra variables of the template at inference, e.g. enable_thinking
    tool_format: str = "json"  # how generated calls are parsed; resolve_template reads it off the template

    @property
    def tools_format(self) -> ToolFormat:
        return get_tool_format(self.tool_format)

    def encode(
        self, tokenizer, messages: list[dict], tools: list[dict] | None = None, train_on_inputs: bool = False
    ) -> tuple[list[int], list[int]]:
        """input_ids and labels (-100 on tokens outside the generation markers).

        transformers derives the mask from its own tokenisation of the whole text, so content holding a special
        token cannot be kept plain here: such a conversation is refused unless allow_special_tokens.
        """
        if not self.allow_special_tokens and holds_special_tokens(tokenizer, messages):
            raise DataError("a message holds a special-token string, which this tokenizer's own chat template would "
                            "make a control token: use a built-in --template_name (it keeps them plain text) or pass "
                            "--allow_special_tokens_in_content")
        out = tokenizer.apply_chat_template(
            to_openai_messages(messages, call_ids=True), tools=tools, chat_template=self.jinja, tokenize=True,
            return_dict=True, return_assistant_tokens_mask=True,
        )
        ids = list(out["input_ids"])
        labels = [i if train_on_inputs or m else IGNORE_INDEX for i, m in zip(ids, out["assistant_masks"])]
        return ids, labels

    def encode_prompt(self, tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """ids of a conversation ending in a user/observation turn plus the assistant generation prompt."""
        extra = self.template_kwargs or {}
        messages = to_openai_messages(messages, call_ids=True)  # what templates that know tools take
        if self.allow_special_tokens:
            return list(tokenizer.apply_chat_template(
                messages, tools=tools, chat_template=self.jinja, add_generation_prompt=True, tokenize=True,
                return_dict=True, **extra)["input_ids"])
        text = tokenizer.apply_chat_template(_escape_content(tokenizer, messages), tools=tools,
                                             chat_template=self.jinja, add_generation_prompt=True, tokenize=False,
                                             **extra)
        return encode_rendered(tokenizer, text)


_CHATML = dict(
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n",
    assistant_prefix="<|im_start|>assistant\n",
    assistant="{content}<|im_end|>",
    assistant_suffix="\n",
    stop_words=("<|im_end|>",),
)
_CHATML_NATIVE_TOOLS = dict(observation="<|im_start|>user\n{content}<|im_end|>\n", tool_format="qwen")

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in [
        Template("chatml", **_CHATML, **_CHATML_NATIVE_TOOLS, tools=CHATML_TOOLS),
        Template(
            "qwen", **_CHATML, **_CHATML_NATIVE_TOOLS, tools=QWEN_TOOLS,
            default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
        ),
        Template(
            "llama3", prefix="<|begin_of_text|>",
            system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
            user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
            assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n", assistant="{content}<|eot_id|>",
            observation="<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>",
            stop_words=("<|eot_id|>",), tool_format="llama3",
        ),
        # Llama 2 repeats BOS before every exchange, so it sits in the user format rather than the prefix.
        Template(
            "llama2", system="<<SYS>>\n{content}\n<</SYS>>\n\n", user="<s>[INST] {content} [/INST]",
            assistant=" {content} </s>", merge_system="first", stop_words=("</s>",),
        ),
        Template(
            "mistral", prefix="<s>", system="{content}\n\n", user="[INST] {content} [/INST]",
            assistant=" {content}</s>", merge_system="first", stop_words=("</s>",),
        ),
        # Mistral's v3 format (Mistral-7B-Instruct-v0.3, Mixtral-8x22B, Mistral NeMo) with its native tools: the
        # system prompt and [AVAILABLE_TOOLS] go with the last user turn, as mistral-common puts them.
        Template(
            "mistral_v3", prefix="<s>", system="{content}\n\n", user="[INST] {content}[/INST]",
            assistant=" {content}</s>", function_call="{content}</s>", observation="{content}", merge_system="last",
            tools="[AVAILABLE_TOOLS] {content}[/AVAILABLE_TOOLS]", tools_placement="last_user",
            tool_format="mistral", stop_words=("</s>",),
        ),
        Template(
            "vicuna", system="{content} ", user="USER: {content} ", assistant_prefix="ASSISTANT:",
            assistant=" {content}</s>", stop_words=("</s>",),
            default_system="A chat between a curious user and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        ),
        Template(
            "alpaca", system="{content}\n\n", user="### Instruction:\n{content}\n\n",
            assistant_prefix="### Response:\n", assistant="{content}</s>", assistant_suffix="\n\n",
            stop_words=("</s>",),
            default_system="Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.",
        ),
        Template(
            "chatglm3", prefix="[gMASK]<sop>", system="<|system|>\n{content}", user="<|user|>\n{content}",
            assistant_prefix="<|assistant|>", assistant="\n{content}</s>", observation="<|observation|>\n{content}",
            tools="Answer the following questions as best as you can. You have access to the following tools:\n"
            "{content}",
            stop_words=("</s>", "<|user|>", "<|observation|>"),
        ),
        # GLM-4 (glm-4-9b-chat) with its native tools. A reply ends with <|endoftext|> (the model's EOS) and a call
        # with <|observation|>, where its result comes: both are trained, so the model learns to stop.
        Template(
            "glm4", prefix="[gMASK]<sop>", system="<|system|>\n{content}", user="<|user|>\n{content}",
            assistant_prefix="<|assistant|>", assistant="\n{content}<|endoftext|>",
            function_call="{content}<|observation|>", observation="\n{content}", tool_format="glm4",
            tools=GLM4_TOOLS, tools_placement="system_block",
            stop_words=("<|endoftext|>", "<|user|>", "<|observation|>"),
        ),
        Template(
            "baichuan2", user="<reserved_106>{content}", assistant_prefix="<reserved_107>",
            assistant="{content}</s>", stop_words=("</s>",),
        ),
        Template(
            "deepseek", prefix="<｜begin▁of▁sentence｜>", system="{content}\n\n", user="User: {content}\n\n",
            assistant_prefix="Assistant:", assistant=" {content}<｜end▁of▁sentence｜>",
            stop_words=("<｜end▁of▁sentence｜>",),
        ),
        # Qwen3: ChatML with Qwen's tool format, no default system, think blocks as its own template writes them.
        # A reply's reasoning comes as a <think>...</think> block in its content; it is trained with the answer.
        Template("qwen3", **_CHATML, **_CHATML_NATIVE_TOOLS, tools=QWEN_TOOLS, think_blocks=True),
        # Qwen3 with thinking off (enable_thinking=False): the generation prompt closes an empty think block.
        Template("qwen3_nothink", **_CHATML, **_CHATML_NATIVE_TOOLS, tools=QWEN_TOOLS, think_blocks=True,
                 prompt_suffix="<think>\n\n</think>\n\n"),
        Template(
            "deepseek3", prefix="<｜begin▁of▁sentence｜>", user="<｜User｜>{content}",
            assistant_prefix="<｜Assistant｜>", assistant="{content}<｜end▁of▁sentence｜>",
            stop_words=("<｜end▁of▁sentence｜>",),
        ),
        # Yi's chat format is ChatML; it has no tool format, so tool turns are written plainly.
        Template("yi", **_CHATML),
        # InternLM2-chat: ChatML after a BOS token (its own tool protocol is not modelled: tools are written plainly).
        Template("internlm2", prefix="<s>", **_CHATML),
    ]
}


# MedicalGPT's --template_name spellings of our templates.
TEMPLATE_ALIASES = {"qwen3_5": "qwen3", "qwen3_5_nothink": "qwen3_nothink", "intern2": "internlm2",
                    "deepseekv3": "deepseek3", "llama3_1": "llama3"}


def get_template(name: str) -> Template:
    """The built-in template called name (or MedicalGPT's name for it)."""
    name = TEMPLATE_ALIASES.get(name, name)
    if name not in TEMPLATES:
        raise UsageError(f"unknown template {name!r}; known templates: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


# Conversations (and whether to add the generation prompt) on which a tokenizer's template is compared to ours.
_PROBES = [
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], False),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "咳嗽怎么办？"},
      {"role": "assistant", "content": "多喝水。"}, {"role": "user", "content": "And fever?"},
      {"role": "assistant", "content": "See a doctor."}], False),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], True),
    ([{"role": "user", "content": "Hi"}], True),
]


def _render_probes(tokenizer, chat_template: str) -> list[str | None]:
    """The probe conversations rendered with chat_template; None where the template rejects one."""
    rendered = []
    for messages, add_generation_prompt in _PROBES:
        try:
            rendered.append(tokenizer.apply_chat_template(
                messages, chat_template=chat_template, tokenize=False, add_generation_prompt=add_generation_prompt,
            ))
        except (jinja2.TemplateError, TypeError, ValueError):  # e.g. a template without a system role
            rendered.append(None)
    return rendered


def resolve_template(tokenizer, template_name: str | None, allow_special_tokens: bool = False,
                     tool_format: str | None = None) -> Template | TokenizerChatTemplate:
    """The named built-in, else the built-in rendering like the tokenizer's template, else that template itself.

    allow_special_tokens: special-token strings in message content become control tokens (trusted training data
    that means them); by default they are plain text. tool_format: how tool calls are written and parsed, where
    the template does not say (default: the template's own, else plain JSON).
    """
    template = with_tool_format(_resolve_template(tokenizer, template_name), tool_format)
    return replace(template, allow_special_tokens=True) if allow_special_tokens else template


def with_tool_format(template, tool_format: str | None):
    """The template writing and parsing tool calls in tool_format (None: in its own format)."""
    return replace(template, tool_format=get_tool_format(tool_format).name) if tool_format else template


def own_tool_format(jinja: str) -> str:
    """The tool format a chat template writes calls in, judged by its text."""
    if "<tool_call>" in jinja:
        return "qwen"
    if "ipython" in jinja and '"parameters": ' in jinja:
        return "llama3"
    if "[TOOL_CALLS]" in jinja:
        return "mistral"
    if "可用工具" in jinja:
        return "glm4"
    return "json"


def _resolve_template(tokenizer, template_name: str | None) -> Template | TokenizerChatTemplate:
    if template_name:
        return get_template(template_name)
    own = tokenizer.chat_template
    if isinstance(own, dict):  # a tokenizer with several named templates
        own = own.get("default")
    if not own:
        raise UsageError(f"the tokenizer has no chat template; pass --template_name one of {', '.join(TEMPLATES)}")
    rendered = _render_probes(tokenizer, own)
    for template in TEMPLATES.values():
        if _render_probes(tokenizer, template.jinja) == rendered:
            return template
    if not GENERATION_MARKER.search(own):
        raise UsageError(
            "the tokenizer's chat template has no {% generation %} markers and matches no built-in template; "
            f"pass --template_name one of {', '.join(TEMPLATES)}"
        )
    return TokenizerChatTemplate(own, stop_words=(tokenizer.eos_token,) if tokenizer.eos_token else (),
                                 tool_format=own_tool_format(own))
