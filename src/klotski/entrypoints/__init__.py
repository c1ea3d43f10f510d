"""Ways in from outside: the OpenAI wire format, the batch job, the server."""
