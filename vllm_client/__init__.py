"""Everything that talks to vLLM goes through here: the client (async, with a sync facade), the
`prompt_embeds` request format, SSE, the error family, and the vLLM child process."""
from vllm_client.client import AsyncVllmClient, Reply, UpstreamResponse, VllmClient, backend_is_ready, served_model_name
from vllm_client.embeds import encode_prompt_embeds, prompt_embeds_base64, request_body_with_embeds
from vllm_client.errors import BackendError, BackendRefused, BackendStartError, BackendUnavailable

__all__ = [
    "AsyncVllmClient", "BackendError", "BackendRefused", "BackendStartError", "BackendUnavailable", "Reply",
    "UpstreamResponse", "VllmClient", "backend_is_ready", "encode_prompt_embeds", "prompt_embeds_base64",
    "request_body_with_embeds", "served_model_name",
]
