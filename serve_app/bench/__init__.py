"""Benchmarks: the pipeline in-process (eager vs optimised) and HTTP load against a URL.

    python -m serve_app.bench --compare --height 512 --width 512 --step 4 --repeat 3
    python -m serve_app.bench --url http://127.0.0.1:8000 -n 50 -c 5
    python -m serve_app.bench --sweep-sizes 512x512,1024x1024 --sweep-steps 1,2,4 \
        --sweep-batches 1,2,4 --plot chart.png   # matplotlib: the 'bench' extra
    python -m serve_app.bench --url http://127.0.0.1:8000 --sweep-concurrency 1,2,4
"""
