"""Reward models, DPO-family, PPO, GRPO/RLOO and SFT trainers on plain torch + transformers.

Nothing in this package imports Django, Celery or the web apps: the web app's training rounds
call exactly this code, and ML staff run it by hand with ``python -m training.core``.
"""
