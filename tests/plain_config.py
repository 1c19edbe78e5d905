"""main.py config for the plain models of test_any_model.py:
--config=tests/plain_config.py:PlainCNN (or :PlainMLP)."""

import test_any_model


def get_config(name):
  return test_any_model.config_for(getattr(test_any_model, name)())
