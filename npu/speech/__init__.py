"""Speech: text to speech and speech to text, on the CPU (Piper, faster-whisper) or the card."""
