"""LLM stages on resolved rows, before layouts: an OpenAI-compatible client (`client`),
the durable call cache (`cache`), reply parsing (`replies`) and the stages that lengthen
answers and generate conversations (`stages`)."""
