"""Input preparation: conversations with images and videos -> the tensors the model takes."""

from .errors import InputError
from .media import MediaPolicy
from .processor import ItemPlan, Plan, Processor
from .tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = ["IncrementalDetokenizer", "InputError", "ItemPlan", "MediaPolicy", "Plan", "Processor", "Tokenizer"]
