"""The demo model: a tiny gpt-oss trained on synthetic harmony conversations (scripts/train_demo.py)
that ships inside the package, so chat, serve and agent flows run for real with zero download.

tools.py: the function tools it knows; conversations.py: the synthetic conversations it learned
from (and the held-out ones it is evaluated on); weights.py: the packaged weights and demo_path().
"""
