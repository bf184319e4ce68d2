"""Generate a candidate pool: short sentences sampled from a causal LM, normalised and cached on disk.

Runs in the pool builder (``neurosteer pool build``), not inside a live session, because sampling
thousands of sentences takes minutes on a CPU. It uses only the model passed in and the pool file
it writes. The prompts are written for base (not instruction-tuned) English models.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import re
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from synth.models import LoadedModel

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_POOL_NAME = "pool_gemma3_270m_6w.txt"

# Each prompt opens a list of six-word sentences on one topic and ends with the next bullet, so a base
# model continues it with one more sentence. Three examples per topic steer length and topic.
_PROMPT_TOPICS: tuple[tuple[str, tuple[str, str, str]], ...] = (
    ("cooking", ("She chopped onions for the soup.", "The bread smelled warm and sweet.",
                 "Who left the pan on fire?")),
    ("the weather", ("Dark clouds gathered over the hills.", "It rained all through the night.",
                     "The morning frost covered every car.")),
    ("family life", ("My sister borrowed my blue jacket.", "Grandpa tells the same story twice.",
                     "We ate dinner together on Sunday.")),
    ("school", ("The teacher wrote on the board.", "Nobody finished the test on time.",
                "Did you bring your math homework?")),
    ("animals", ("The old dog slept all day.", "A fox crossed the empty road.",
                 "Bees were buzzing around the flowers.")),
    ("the sea", ("Waves crashed against the stone wall.", "The fishermen left before the sunrise.",
                 "Salt dried white on my skin.")),
    ("travel", ("Our train was three hours late.", "She lost her passport in Rome.",
                "The hotel room smelled of smoke.")),
    ("work and offices", ("The meeting ran an hour over.", "My boss forgot my name again.",
                          "Everyone pretended to read the report.")),
    ("sport", ("The striker missed an easy goal.", "We lost the match in overtime.",
               "Her legs ached after the race.")),
    ("music", ("He played the violin every evening.", "The band tuned their guitars slowly.",
               "That song reminds me of summer.")),
    ("science", ("The experiment failed a third time.", "Light travels faster than any sound.",
                 "She measured the sample very carefully.")),
    ("history", ("The castle walls fell after weeks.", "Ancient traders crossed the burning desert.",
                 "The king signed the treaty reluctantly.")),
    ("money", ("He saved every coin he found.", "Prices went up again this month.",
               "Can you lend me some cash?")),
    ("health", ("The doctor listened to my heart.", "I caught a cold last week.",
                "She walks five miles every morning.")),
    ("city life", ("Traffic crawled along the wet avenue.", "Sirens wailed somewhere in the distance.",
                   "The corner shop never seems closed.")),
    ("the countryside", ("Sheep grazed on the green hillside.", "The farmer repaired the broken fence.",
                         "Wild roses grew along the lane.")),
    ("friendship", ("We have been friends since childhood.", "He never forgot my birthday once.",
                    "Why did she stop calling me?")),
    ("love", ("She smiled when he walked in.", "They danced until the lights dimmed.",
              "I wrote you a long letter.")),
    ("fear", ("Something scratched at the window again.", "The stairs creaked in the dark.",
              "I heard footsteps behind me tonight.")),
    ("childhood memories", ("We built forts from old blankets.", "I fell off my bike once.",
                            "Mother sang to us every night.")),
    ("technology", ("My phone died in the afternoon.", "The printer jammed during the meeting.",
                    "He fixed the old laptop himself.")),
    ("gardening", ("The tomatoes ripened in late summer.", "Weeds took over the vegetable patch.",
                   "She planted tulips along the path.")),
    ("shopping", ("The market was crowded on Saturday.", "I forgot to buy fresh milk.",
                  "These shoes were on sale today.")),
    ("art", ("The painter mixed blue with grey.", "Nobody understood the strange bronze sculpture.",
             "Her drawings covered the kitchen wall.")),
    ("books and reading", ("I read the whole novel overnight.", "The library smelled of old paper.",
                           "He underlined every sentence he liked.")),
    ("politics", ("The senator avoided every hard question.", "Voters waited hours in the rain.",
                  "The new law surprised almost everyone.")),
    ("the night sky", ("The stars were unusually bright tonight.", "A comet crossed the northern sky.",
                       "The moon hid behind thin clouds.")),
    ("houses and homes", ("The roof leaked above my bed.", "They painted the kitchen bright yellow.",
                          "Our neighbours moved out last spring.")),
    ("emotions", ("He felt strangely calm that morning.", "Her anger faded into quiet sadness.",
                  "I was nervous before the interview.")),
    ("strange dreams", ("Clocks were melting on the stairs.", "A whale sang inside my bedroom.",
                        "My teeth turned into small birds.")),
    ("questions people ask", ("Where did you park the car?", "Have you ever seen the ocean?",
                              "What time does the shop close?")),
    ("exclamations", ("What a wonderful surprise this is!", "Watch out for that falling branch!",
                      "I cannot believe we actually won!")),
    ("everyday conversation", ("I think the oven is on.", "You should really call your mother.",
                               "Let me know when you arrive.")),
    ("old sayings", ("Every cloud has a silver lining.", "Actions speak louder than mere words.",
                     "Still waters run deep, they say.")),
    ("nonsense", ("Purple ideas sleep beneath the teapot.", "The bicycle argued with the lighthouse.",
                  "Seven spoons whispered about the rain.")),
    ("the news", ("Floods closed roads across the region.", "The factory will shut next year.",
                  "Police are searching for the driver.")),
)


def _topic_prompt(topic: str, examples: Sequence[str]) -> str:
    lines = "".join(f"- {example}\n" for example in examples)
    return f"A list of simple six-word sentences about {topic}:\n{lines}-"


DEFAULT_PROMPTS: tuple[str, ...] = tuple(
    _topic_prompt(topic, examples) for topic, examples in _PROMPT_TOPICS
)

# The nucleus is searched among the TOP_K_BOUND likeliest tokens (torch.topk) instead of sorting all
# 262,144 tokens of Gemma 3's vocabulary at each step. With Gemma 3 270M at top_p 0.9, 1.1% of the
# 117,616 draws that built the default pool had a wider nucleus, and the mass cut off averaged 0.0002
# per draw. A bound of 256 would cut 10.7% of draws (benchmarks/pool_generation.py --nucleus).
TOP_K_BOUND = 1024


class PoolGenerationError(RuntimeError):
    """Sampling that keeps too few sentences to fill the requested pool."""


_QUOTES = "\"'`“”‘’«»„"
_TYPOGRAPHIC = str.maketrans({"’": "'", "‘": "'", "“": '"', "”": '"', "„": '"', "–": "-",
                              "\u00a0": " "})
# A list marker before the sentence: a bullet, or a number or letter followed by "." or ")".
_LIST_MARKER = re.compile(r"^(?:[-*•·–—>]+|\(?\d{1,3}[.)]|\(?[a-zA-Z][)])\s+")
_LETTER = r"[^\W\d_]"
# A word: letters, with single inner apostrophes or hyphens (don't, well-known) and an optional final
# apostrophe (the dogs'), followed by at most one comma or semicolon.
_WORD = re.compile(rf"{_LETTER}+(?:['-]{_LETTER}+)*'?[,;]?")
_END_MARKS = ".!?"


def normalise_sentence(text: str) -> str | None:
    """Return ``text`` as one clean sentence, or None when it is not one well-formed sentence.

    Normalisation applies Unicode NFC, makes typographic quotes and apostrophes plain, collapses
    whitespace to single spaces, and removes a leading list marker (``-``, ``*``, ``•``, ``3.``,
    ``(b)``) and enclosing quotes. The result is well-formed when all of these hold:

    - it starts with a capital letter;
    - it ends with exactly one of ``.``, ``!`` or ``?`` and has no other sentence end;
    - every word is letters with inner apostrophes or hyphens, then at most a comma or semicolon,
      so digits, URLs, markup, brackets, colons and inner quotes are rejected;
    - no word of two or more letters is all capitals (acronyms, shouting);
    - no word repeats the word before it (``the the``), ignoring case.
    """
    cleaned = unicodedata.normalize("NFC", text).translate(_TYPOGRAPHIC)
    cleaned = " ".join(cleaned.split())
    cleaned = _LIST_MARKER.sub("", cleaned)
    cleaned = cleaned.strip(_QUOTES + " ")
    if len(cleaned) < 2:
        return None

    body, end_mark = cleaned[:-1].rstrip(), cleaned[-1]
    if end_mark not in _END_MARKS or not body[:1].isupper():
        return None

    words = body.split(" ")
    previous = ""
    for word in words:
        if not _WORD.fullmatch(word):
            return None
        letters = word.rstrip(",;")
        if len(letters) > 1 and letters.isupper():
            return None
        if letters.casefold() == previous:
            return None
        previous = letters.casefold()
    if words[-1][-1] in ",;":
        return None
    return f"{body}{end_mark}"


def count_words(text: str) -> int:
    """Return the number of words: whitespace-separated tokens that contain at least one letter."""
    return sum(1 for token in text.split() if any(char.isalpha() for char in token))


def dedup_key(sentence: str) -> str:
    """Return the key under which two sentences count as duplicates: case and punctuation ignored."""
    return " ".join(re.sub(r"[^\w\s'-]", "", sentence).casefold().split())


def _first_sentence(continuation: str) -> str:
    """Cut a sampled continuation after its first sentence end (and any closing quote) or newline.

    A run of end marks (``...``, ``?!``) stays whole, so that :func:`normalise_sentence` rejects it.
    """
    line = continuation.split("\n", 1)[0]
    match = re.search(rf"[{re.escape(_END_MARKS)}]+[{re.escape(_QUOTES)}]*", line)
    return line[: match.end()] if match else line


def example_sentence_keys(prompts: Sequence[str]) -> set[str]:
    """Return the dedup keys of the sentences quoted in the prompts, so copies of them are not kept."""
    keys = set()
    for prompt in prompts:
        for line in prompt.splitlines():
            sentence = normalise_sentence(line)
            if sentence is not None:
                keys.add(dedup_key(sentence))
    return keys


@dataclass
class SamplingCounts:
    """Running counts of a pool generation: continuations sampled and filtered, draws and cut nuclei."""

    n_rows: int = 0
    n_finished: int = 0
    n_well_formed: int = 0
    n_exact_length: int = 0
    n_draws: int = 0
    n_cut_draws: int = 0
    cut_mass: float = 0.0

    def as_dict(self) -> dict:
        """Return the counts with the derived yields, as recorded beside a pool."""
        return {
            "n_rows_sampled": self.n_rows,
            "n_finished": self.n_finished,
            "n_well_formed": self.n_well_formed,
            "n_exact_length": self.n_exact_length,
            "exact_length_yield": round(self.n_exact_length / max(self.n_rows, 1), 4),
            "n_draws": self.n_draws,
            "cut_nucleus_fraction": round(self.n_cut_draws / max(self.n_draws, 1), 6),
            "cut_nucleus_mass_mean": round(self.cut_mass / max(self.n_draws, 1), 8),
        }


@dataclass(frozen=True)
class GenerationResult:
    """Sentences kept by :func:`generate_pool`, with the settings, counts and time behind them."""

    sentences: list[str]
    model_identity: str
    settings: dict
    counts: SamplingCounts
    elapsed_s: float

    @property
    def sentences_per_s(self) -> float:
        return len(self.sentences) / self.elapsed_s if self.elapsed_s > 0 else math.inf

    def metadata(self) -> dict:
        """Return what :func:`write_pool` records beside the pool: model, settings, yield and speed."""
        return {
            "model": self.model_identity,
            "settings": self.settings,
            **self.counts.as_dict(),
            "generation_time_s": round(self.elapsed_s, 2),
            "sentences_per_s": round(self.sentences_per_s, 3),
        }


def sample_top_p(
    logits: torch.Tensor,
    top_p: float,
    temperature: float,
    generator: torch.Generator,
    top_k: int = TOP_K_BOUND,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from the top-p nucleus, searched among the ``top_k`` likeliest tokens.

    ``logits`` has shape (n_rows, vocab_size). Probabilities are normalised over the whole vocabulary,
    so a nucleus that would reach past ``top_k`` tokens is cut there, not widened by renormalising.
    Returns the token ids, shape (n_rows,), and the nucleus mass cut off in each row, shape (n_rows,),
    zero where the nucleus fitted.
    """
    import torch

    scaled = logits if temperature == 1.0 else logits.float() / temperature
    probs = torch.softmax(scaled, dim=-1, dtype=torch.float32)
    top_probs, top_ids = torch.topk(probs, k=min(top_k, probs.shape[-1]), dim=-1)
    cumulative = top_probs.cumsum(dim=-1)

    # The nucleus is the shortest prefix of the sorted tokens whose mass reaches top_p: a token is in
    # it when the mass before it is still below top_p, so the likeliest token always is.
    in_nucleus = (cumulative - top_probs) < top_p
    cut_mass = (top_p - cumulative[:, -1]).clamp(min=0.0)
    choice = torch.multinomial(top_probs * in_nucleus, 1, generator=generator)
    return top_ids.gather(-1, choice).squeeze(-1), cut_mass


def _cache_keyword(model: torch.nn.Module) -> str:
    # transformers 5.25 names the forward argument cache and marks past_key_values deprecated until
    # 5.40. Releases 4.x have only past_key_values.
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def sample_continuations(
    loaded: LoadedModel,
    prompt: str,
    n_rows: int,
    n_words: int,
    top_p: float,
    temperature: float,
    top_k: int,
    max_new_tokens: int,
    generator: torch.Generator,
    counts: SamplingCounts,
) -> list[str]:
    """Sample ``n_rows`` continuations of one prompt, each ended at its first sentence end or newline.

    The prompt is run once and its KV cache copied to every row. A row that reaches ``n_words + 1``
    words, or ``max_new_tokens`` tokens without an end, leaves the batch at once and is not returned.
    Adds the rows, draws and cut nuclei to ``counts``.
    """
    import torch

    model, tokenizer, device = loaded.model, loaded.tokenizer, loaded.device
    cache_keyword = _cache_keyword(model)
    stop_ids = set(tokenizer.all_special_ids)
    counts.n_rows += n_rows

    # NOTE: run only on the CPU so far. Every tensor and the generator live on loaded.device, but the
    # CUDA path has not been run.

    # Prefill the prompt once and share its cache among the rows.
    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    outputs = model(input_ids=prompt_ids, use_cache=True, logits_to_keep=1)
    cache = getattr(outputs, "cache", None)
    if cache is None:
        cache = outputs.past_key_values
    cache.batch_repeat_interleave(n_rows)
    logits = outputs.logits[:, -1, :].expand(n_rows, -1)
    position = prompt_ids.shape[1]

    active_rows = list(range(n_rows))
    row_tokens: list[list[int]] = [[] for _ in range(n_rows)]
    finished: list[str] = []
    for step in range(max_new_tokens):
        next_ids, cut_mass = sample_top_p(logits, top_p, temperature, generator, top_k)
        counts.n_draws += len(active_rows)
        counts.n_cut_draws += int((cut_mass > 0).sum())
        counts.cut_mass += float(cut_mass.sum())

        # Retire rows that ended a sentence or a line, and drop rows already past n_words words.
        kept_slots = []
        for slot, token in enumerate(next_ids.tolist()):
            row = active_rows[slot]
            if token in stop_ids:
                finished.append(tokenizer.decode(row_tokens[row], skip_special_tokens=True))
                continue
            row_tokens[row].append(token)
            text = tokenizer.decode(row_tokens[row], skip_special_tokens=True)
            if "\n" in text or any(mark in text for mark in _END_MARKS):
                finished.append(text)
            elif count_words(text) <= n_words:
                kept_slots.append(slot)
        if not kept_slots or step == max_new_tokens - 1:
            break

        # Shrink the batch and its cache to the rows still going, and feed each its last token.
        if len(kept_slots) < len(active_rows):
            index = torch.tensor(kept_slots, device=device)
            cache.batch_select_indices(index)
            next_ids = next_ids[index]
            active_rows = [active_rows[slot] for slot in kept_slots]
        position_ids = torch.full((len(active_rows), 1), position, device=device)
        outputs = model(
            input_ids=next_ids[:, None],
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{cache_keyword: cache},
        )
        logits = outputs.logits[:, -1, :]
        position += 1

    counts.n_finished += len(finished)
    return finished


def select_sentences(continuations: Sequence[str], n_words: int, seen: set[str],
                     counts: SamplingCounts) -> list[str]:
    """Return the continuations that normalise to new sentences of exactly ``n_words`` words.

    Each continuation is cut after its first sentence and normalised with
    :func:`normalise_sentence`. A sentence is new when its :func:`dedup_key` is not in ``seen``, and
    its key is then added to ``seen``. The well-formed and exact-length continuations are counted in
    ``counts``.
    """
    new_sentences = []
    for continuation in continuations:
        sentence = normalise_sentence(_first_sentence(continuation))
        if sentence is None:
            continue
        counts.n_well_formed += 1
        if count_words(sentence) != n_words:
            continue
        counts.n_exact_length += 1
        key = dedup_key(sentence)
        if key not in seen:
            seen.add(key)
            new_sentences.append(sentence)
    return new_sentences


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _check_settings(n_sentences: int, n_words: int, prompts: Sequence[str], top_p: float,
                    temperature: float, batch_size: int, top_k: int) -> None:
    if n_sentences < 1:
        raise ValueError(f"n_sentences must be at least 1, got {n_sentences}.")
    if n_words < 1:
        raise ValueError(f"n_words must be at least 1, got {n_words}.")
    if not prompts:
        raise ValueError("prompts is empty; give at least one prompt or use DEFAULT_PROMPTS.")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
    if temperature <= 0.0:
        raise ValueError(f"temperature must be positive, got {temperature}; use a small value "
                         "such as 0.1 for near-greedy sampling.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}.")
    if tuple(prompts) == DEFAULT_PROMPTS and n_words != 6:
        logger.warning("The default prompts show six-word examples, so with n_words=%d expect a "
                       "lower yield, or pass prompts with %d-word examples.", n_words, n_words)


def generate_pool(
    loaded: LoadedModel,
    n_sentences: int,
    n_words: int = 6,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    seed: int = 0,
    top_p: float = 0.9,
    temperature: float = 1.0,
    batch_size: int = 64,
    max_new_tokens: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    top_k: int = TOP_K_BOUND,
    max_rows: int | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> GenerationResult:
    """Sample ``n_sentences`` distinct, well-formed sentences of exactly ``n_words`` words.

    Each batch continues one prompt ``batch_size`` times, taking the prompts in a seeded order and
    cycling through them. Continuations are normalised with :func:`normalise_sentence`, kept when they
    have exactly ``n_words`` words, and deduplicated by :func:`dedup_key`, which also drops copies of
    the prompts' example sentences. ``max_new_tokens`` defaults to ``3 * n_words + 4``. The draws come
    from a ``torch.Generator`` seeded with ``seed`` on the model's device, so a seed repeats its
    sentences on the same device, dtype, thread count and library versions. ``progress`` is called
    after each batch with (sentences kept, ``n_sentences``). ``clock`` times the run in seconds.

    Raises:
        PoolGenerationError: when ``max_rows`` continuations (default ``50 * n_sentences``, a yield
            of 2%) were sampled without filling the pool.
    """
    import torch

    _check_settings(n_sentences, n_words, prompts, top_p, temperature, batch_size, top_k)
    max_new_tokens = 3 * n_words + 4 if max_new_tokens is None else max_new_tokens
    max_rows = 50 * n_sentences if max_rows is None else max_rows
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    settings = {
        "n_words": n_words, "seed": seed, "top_p": top_p, "temperature": temperature,
        "top_k_bound": top_k, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
        "device": str(loaded.device), "dtype": str(loaded.dtype).removeprefix("torch."),
        "prompts": list(prompts),
        "versions": {"torch": torch.__version__, "transformers": _transformers_version()},
        "cpu_threads": torch.get_num_threads(),
    }

    generator = torch.Generator(device=loaded.device).manual_seed(seed)
    order_generator = torch.Generator().manual_seed(seed)
    seen = example_sentence_keys(prompts)
    counts = SamplingCounts()
    sentences: list[str] = []
    order: list[int] = []
    start = clock()
    with torch.inference_mode():
        while len(sentences) < n_sentences:
            if counts.n_rows >= max_rows:
                raise PoolGenerationError(
                    f"Only {len(sentences)} of {n_sentences} sentences after sampling "
                    f"{counts.n_rows} continuations, of which {counts.n_well_formed} were "
                    f"well-formed and {counts.n_exact_length} had exactly {n_words} words. Give "
                    "prompts whose examples have that many words, raise max_rows, or lower "
                    "n_sentences."
                )
            if not order:
                order = torch.randperm(len(prompts), generator=order_generator).tolist()
            prompt = prompts[order.pop(0)]

            continuations = sample_continuations(
                loaded, prompt, batch_size, n_words, top_p, temperature, top_k, max_new_tokens,
                generator, counts,
            )
            for sentence in select_sentences(continuations, n_words, seen, counts):
                if len(sentences) < n_sentences:
                    sentences.append(sentence)
            if progress is not None:
                progress(len(sentences), n_sentences)
    elapsed = clock() - start

    result = GenerationResult(sentences, loaded.identity, settings, counts, elapsed)
    logger.info(
        "Generated %d sentences of %d words in %.1f s (%.2f/s); %.1f%% of %d continuations had "
        "exactly %d words; %.3f%% of draws had their nucleus cut at the top %d tokens.",
        len(sentences), n_words, elapsed, result.sentences_per_s,
        100 * counts.n_exact_length / counts.n_rows, counts.n_rows, n_words,
        100 * counts.n_cut_draws / max(counts.n_draws, 1), top_k,
    )
    return result


def generate_sentences(loaded: LoadedModel, n_sentences: int, **options) -> list[str]:
    """Sample ``n_sentences`` distinct sentences; the options are those of :func:`generate_pool`."""
    return generate_pool(loaded, n_sentences, **options).sentences


def write_pool(path: str | Path, sentences: Sequence[str], metadata: dict,
               created: datetime | None = None) -> None:
    """Write a pool as UTF-8 text, one sentence a line, and its metadata to ``<path>.json``.

    The sidecar records ``metadata`` (for example :meth:`GenerationResult.metadata`) plus the number of
    sentences and ``created`` (UTC now by default). Both files are written under temporary names and
    renamed, so a reader never sees half a pool.
    """
    path = Path(path)
    for sentence in sentences:
        if not sentence or "\n" in sentence or sentence != sentence.strip():
            raise ValueError(f"Pool sentences must be single non-empty lines, got {sentence!r}.")
    created = datetime.now(UTC) if created is None else created
    sidecar = {**metadata, "n_sentences": len(sentences),
               "created": created.isoformat(timespec="seconds")}

    path.parent.mkdir(parents=True, exist_ok=True)
    sidecar_path = path.with_name(path.name + ".json")
    for target, text in ((path, "".join(f"{s}\n" for s in sentences)),
                         (sidecar_path, json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n")):
        partial = target.with_name(f".{target.name}.partial")
        partial.write_text(text, encoding="utf-8")
        partial.replace(target)
