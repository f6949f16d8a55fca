"""`enginepy serve`: an HTTP server (FastAPI + uvicorn) over the step engine. See app.py for the API."""

# A text request is a prompt and a few numbers (512 T5 tokens are a few KiB); one with audio (melody,
# audio_prompt) carries a base64 file: 8 MiB holds 30 s of 44.1 kHz stereo 16-bit WAV (7.1 MB in base64), the
# longest melody the chroma uses, and keeps a flood of large bodies from costing much memory.
MAX_BODY_BYTES = 8 * 1024 * 1024
