"""Serve models over HTTP: an OpenAI-compatible API, access control by API keys, a web chat page.

    lmforge keys create --keys keys.json --name alice --scopes chat,completions
    lmforge serve runs/chat smollm2-135m-instruct --keys keys.json         # http://127.0.0.1:8000/

    lmforge.server.keys      the keys file: salted hashes, scopes, models, rate limits, expiry
    lmforge.server.engine    continuous batching over the one generate step: requests join and leave a running batch
    lmforge.server.app       the FastAPI application: routes, request and response models, errors, metrics, audit log
    lmforge.server.static    the web chat page (one HTML file, no build step)
"""
