"""truthmap: find where a language model knows that it is wrong."""

from truthmap.errors import ConfigError, DataError, ModelError, ProbeError, StoreError, TruthmapError

__version__ = "0.1.0"



def answer(questions=None, detector=None, **options):
    """Answer questions with a saved detector's model; each answer with error_probability and, given max_fpr or
    min_recall, a flag (truthmap.flagged.answer: the options, and what it returns)."""
    from truthmap.flagged import answer as answer_questions

    return answer_questions(questions, detector, **options)


__all__ = ["answer", "ConfigError", "DataError", "ModelError", "ProbeError", "StoreError", "TruthmapError", "__version__"]
