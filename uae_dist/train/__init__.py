"""The training engine shared by pretraining and fine-tuning (see ``loop.py``)."""
