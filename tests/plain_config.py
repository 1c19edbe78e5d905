"""main.py config for the models of test_any_model.py and test_api.py:
--config=tests/plain_config.py:PlainCNN (a class of test_any_model), or
:linen_resnet (a name test_api.pipeline_config knows)."""

import test_any_model
import test_api


def get_config(name):
  if hasattr(test_any_model, name):
    return test_any_model.config_for(getattr(test_any_model, name)())
  return test_api.pipeline_config(name)
