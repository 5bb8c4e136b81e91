"""Reading a posterior: the `SoapBubble` type (`bubble`), its read-outs (`posterior`), the
predictive distributions (`predictive`) and calibration metrics (`metrics`)."""
