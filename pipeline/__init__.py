"""ielts-distill: distil IELTS Task 1 chart essays from a teacher LLM into a small VLM."""
__version__ = "0.1.0"
