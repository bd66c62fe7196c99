"""LLM access for the teacher and the judge: the client (``client``), the embedded llama.cpp server
(``server``) and the item runner (``runner``). A library: nothing here imports the stage machinery
(pipeline.context, pipeline.stages); ``pipeline.items.run_stage_items`` puts the runner into a stage."""

from pipeline.llm.client import (
                                 Answer,
                                 BudgetExceeded,
                                 Completion,
                                 FatalLLMError,
                                 LLMClient,
                                 LLMError,
                                 TransientLLMError,
                                 Usage,
                                 ask_parsed,
                                 image_data_url,
                                 image_mime,
                                 strip_think,
                                 user_message,
)
from pipeline.llm.preflight import check_endpoint
from pipeline.llm.runner import RunSummary, run_items
from pipeline.llm.server import embedded_server, find_gguf

__all__ = ["Answer", "BudgetExceeded", "ask_parsed", "Completion", "FatalLLMError", "check_endpoint", "LLMClient", "LLMError", "RunSummary",
           "TransientLLMError", "Usage", "embedded_server", "find_gguf", "image_data_url", "image_mime",
           "run_items", "strip_think", "user_message"]
