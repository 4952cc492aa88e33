"""The dlib DNN file codec: the editable tree, the records dlibbridge writes, inspection and unfreeze/freeze rewrites.  Never imports torch (test-enforced)."""
