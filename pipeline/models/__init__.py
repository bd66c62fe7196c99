"""The student: loading, the tiny random student, chat formatting + label masking, batched generation.

Submodules import torch/transformers inside their functions, so importing this package stays cheap.
"""

from pipeline.models.chat import IGNORE_INDEX, collate, encode, user_prompt
from pipeline.models.generation import GenerationResult, generate_essays
from pipeline.models.loading import add_lora, load_student
from pipeline.models.tiny import build_tiny_student

__all__ = ["IGNORE_INDEX", "GenerationResult", "add_lora", "build_tiny_student", "collate", "encode",
           "generate_essays", "load_student", "user_prompt"]
