"""Special tokens, the llava_v1 prompt template, and prompt/label building.

The strings here are the reference's verbatim (docs/model.md §1-3, §11). Every prompt in the
project is built by this module, so training and inference can never drift apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from legion.errors import DataError

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200  # stands for "all image embeddings"; never a real token id
IMAGE_PLACEHOLDER = "<image>"

IM_START, IM_END, BBOX, POINT = "<im_start>", "<im_end>", "<bbox>", "<point>"
SEG, P_START, P_END = "[SEG]", "<p>", "</p>"
# GLaMM's order; with a 32000-token LLaMA vocabulary they get ids 32000..32006.
SPECIAL_TOKENS = [IM_START, IM_END, BBOX, POINT, SEG, P_START, P_END]
GLAMM_SPECIAL_TOKEN_IDS = {tok: 32000 + i for i, tok in enumerate(SPECIAL_TOKENS)}

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
ROLES = ("USER", "ASSISTANT")

GCG_QUESTION = (
    "Please provide a detailed analysis of artifacts in this photo, considering physical artifacts "
    "(e.g., optical display issues, violations of physical laws, and spatial/perspective errors), "
    "structural artifacts (e.g., deformed objects, asymmetry, or distorted text), and distortion "
    "artifacts (e.g., color/texture distortion, noise/blur, artistic style errors, and material "
    "misrepresentation). Output with interleaved segmentation masks for the corresponding parts of the answer."
)
USER_TURN_PREFIX = f"The {IMAGE_PLACEHOLDER} provides an overview of the picture.\n"


@dataclass(frozen=True)
class SpecialTokenIds:
    im_start: int
    im_end: int
    bbox: int
    point: int
    seg: int
    p_start: int
    p_end: int
    eos: int
    pad: int


def add_special_tokens(tokenizer) -> int:
    """Add LEGION's tokens to a tokenizer built from scratch (GLaMM order). Returns how many were added."""
    return tokenizer.add_tokens(SPECIAL_TOKENS, special_tokens=True)


def special_token_ids(tokenizer, expect_glamm_ids: bool | None = None) -> SpecialTokenIds:
    """Look up ids with `convert_tokens_to_ids` (never by tokenizing the string: GLaMM #73).

    With a 32000-token base vocabulary the ids must be GLaMM's 32000..32006; pass
    `expect_glamm_ids=False` to skip that check (tiny tokenizers).
    """
    ids = {}
    unk = tokenizer.unk_token_id
    for tok in SPECIAL_TOKENS:
        idx = tokenizer.convert_tokens_to_ids(tok)
        if idx is None or (unk is not None and idx == unk):
            raise DataError(f"tokenizer has no special token {tok!r}; was it built for LEGION/GLaMM?")
        ids[tok] = idx
    if expect_glamm_ids is None:
        expect_glamm_ids = min(ids.values()) >= 32000 and len(tokenizer) <= 32007
    if expect_glamm_ids and ids != GLAMM_SPECIAL_TOKEN_IDS:
        raise DataError(f"special token ids {ids} differ from GLaMM's {GLAMM_SPECIAL_TOKEN_IDS}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return SpecialTokenIds(
        ids[IM_START],
        ids[IM_END],
        ids[BBOX],
        ids[POINT],
        ids[SEG],
        ids[P_START],
        ids[P_END],
        tokenizer.eos_token_id,
        pad,
    )


# --- prompt rendering (llava_v1: sep " " after USER, "</s>" after ASSISTANT) ------------
def user_message(question: str = GCG_QUESTION, use_im_start_end: bool = True) -> str:
    image = f"{IM_START}{IMAGE_PLACEHOLDER}{IM_END}" if use_im_start_end else IMAGE_PLACEHOLDER
    return USER_TURN_PREFIX.replace(IMAGE_PLACEHOLDER, image) + question


def render_prompt(question: str = GCG_QUESTION, use_im_start_end: bool = True) -> str:
    """The generation prompt: everything up to and including `ASSISTANT:`."""
    return f"{SYSTEM} {ROLES[0]}: {user_message(question, use_im_start_end)} {ROLES[1]}:"


def render_conversation(answer: str, question: str = GCG_QUESTION, use_im_start_end: bool = True) -> str:
    """The full training string, ending with `</s>`."""
    return f"{render_prompt(question, use_im_start_end)} {answer}</s>"


def tag_phrase(span: str) -> str:
    """`<p> span </p> [SEG]`: how a grounded phrase appears in an answer."""
    return f"{P_START} {span} {P_END} {SEG}"


# --- tokenization ------------------------------------------------------------------------
def tokenize_with_image(text: str, tokenizer) -> list[int]:
    """Token ids of `text` with IMAGE_TOKEN_INDEX where `<image>` stands; BOS only at the start."""
    chunks = text.split(IMAGE_PLACEHOLDER)
    ids: list[int] = tokenizer(chunks[0], add_special_tokens=True).input_ids
    for chunk in chunks[1:]:
        ids.append(IMAGE_TOKEN_INDEX)
        part = tokenizer(chunk, add_special_tokens=True).input_ids
        if part and tokenizer.bos_token_id is not None and part[0] == tokenizer.bos_token_id:
            part = part[1:]
        ids.extend(part)
    return ids


def encode_prompt(tokenizer, question: str = GCG_QUESTION, use_im_start_end: bool = True) -> torch.Tensor:
    """Generation input ids [L] (with one IMAGE_TOKEN_INDEX)."""
    return torch.tensor(tokenize_with_image(render_prompt(question, use_im_start_end), tokenizer))


def encode_conversation(
    tokenizer, answer: str, question: str = GCG_QUESTION, use_im_start_end: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [L], labels [L]) for one training conversation.

    The whole string, `</s>` included, is tokenized once, as the reference does (so a space before
    `</s>` is stripped like next to any special token). The answer boundary is found by tokenizing
    the prompt and checking that its ids are a prefix of the full ids (the reference's `len - 2`
    arithmetic broke with every tokenizer upgrade). Supervised: the answer tokens and the final `</s>`.
    """
    prompt = render_prompt(question, use_im_start_end)
    full = tokenize_with_image(render_conversation(answer, question, use_im_start_end), tokenizer)
    head = tokenize_with_image(prompt, tokenizer)
    if full[: len(head)] != head:
        raise ValueError(
            "prompt tokens are not a prefix of the conversation tokens; the tokenizer merges across the "
            f"'ASSISTANT:' boundary (prompt tail {head[-4:]}, conversation {full[len(head) - 4 : len(head) + 2]})"
        )
    if full[-1] != tokenizer.eos_token_id:
        raise ValueError(f"the conversation does not end with </s> (id {tokenizer.eos_token_id}): {full[-3:]}")
    labels = list(full)
    labels[: len(head)] = [IGNORE_INDEX] * len(head)
    return torch.tensor(full), torch.tensor(labels)


# --- parsing generated text (the reference's clean-up; only known tags are removed) --------
_PHRASE_RE = re.compile(re.escape(P_START) + r"(.*?)" + re.escape(P_END))
_KNOWN_TAGS_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS + ["</s>", "<s>", "<unk>"]))


def parse_answer(text: str) -> tuple[str, list[str]]:
    """(explanation, phrases) from the decoded answer, as the reference's inference cleans it.

    Newlines are deleted and double spaces halved; only the text after the last `ASSISTANT: ` is
    kept; phrases: every `<p> ... </p>` in order, stripped; explanation: the text with LEGION's tags,
    `[SEG]`, `<s>`, `</s>` and `<unk>` removed and whitespace collapsed. Two deliberate differences
    from the reference (docs/reproduce.md): other angle-bracket text (`<b>`, `x < y > z`) is kept
    where the reference deletes anything between `<` and `>`, and quotes at either end are kept.
    """
    text = text.replace("\n", "").replace("  ", " ")
    text = text.split(f"{ROLES[1]}: ")[-1]
    phrases = [p.strip() for p in _PHRASE_RE.findall(text)]
    explanation = " ".join(_KNOWN_TAGS_RE.sub("", text).split())
    return explanation, phrases


def to_glamm_ids(ids: torch.Tensor, tokenizer, vocab_size: int) -> torch.Tensor:
    """Move a small tokenizer's special-token ids onto GLaMM's 32000..32006.

    Lets benchmarks feed the 32007-token legion_7b model with text from the tiny tokenizer (no LLaMA
    tokenizer ships with this project). Models with a smaller vocabulary get the ids unchanged.
    """
    out = ids.clone()
    if vocab_size < 32007:
        return out
    for tok, glamm_id in GLAMM_SPECIAL_TOKEN_IDS.items():
        out[ids == tokenizer.convert_tokens_to_ids(tok)] = glamm_id
    return out
