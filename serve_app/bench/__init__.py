"""Benchmarks: the pipeline in-process (eager vs optimised) and HTTP load against a URL.

    python -m serve_app.bench --compare --height 512 --width 512 --step 4 --repeat 3
    python -m serve_app.bench --url http://127.0.0.1:8000 -n 50 -c 5
"""
