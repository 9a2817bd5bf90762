"""Names shared by the library's cleanup and the buckets' lifecycle rules (terraform/ reads these).

In ``lifecycle`` cleanup mode cloudckpt does not delete unreferenced chunks
itself; it marks them, and a bucket rule removes marked objects:

* S3: the object tag ``EXPIRED_TAG_KEY=EXPIRED_TAG_VALUE``; the rule filters on that tag.
* GCS: the object's ``customTime`` is set to the moment of marking; the rule
  uses ``daysSinceCustomTime``.
"""

EXPIRED_TAG_KEY = "cloudckpt-expired"
EXPIRED_TAG_VALUE = "true"
GCS_EXPIRED_FIELD = "customTime"
#: Prefix (under the checkpoint root) of content-addressed chunk objects.
CHUNK_PREFIX = "chunks/"
#: Days after marking (or after a multipart upload began) that bucket rules wait before removal.
EXPIRE_AFTER_DAYS = 1
