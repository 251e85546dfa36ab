"""PHP engine struct layouts, derived from Debian's php-dev headers by a compiled offsetof() program.

The table below is the output of `derive_layout()` run against `php8.2-dev` 8.2.36-1~deb12u1 (headers in
/usr/include/php/20220829, `main/php_config.h`: ZTS undefined, ZEND_DEBUG 0) with gcc on amd64. It is
keyed by the Zend extension API number and the thread-safety mode that the binary itself states in its
ZEND_EXTENSION_BUILD_ID string ("API420220829,NTS"), and `php.py` checks it against the exact build:
`sizeof(zend_executor_globals)` and `sizeof(sapi_globals_struct)` must equal the sizes of the
`executor_globals` and `sapi_globals` symbols in that binary's .dynsym. tests/unit/test_interp_php_layout.py
re-derives the table from the headers when gcc and the headers are available and fails on any drift.
Nothing here reads guest memory.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from nephoscope.core.errors import KnowledgeError

# The members the reader uses; "sizeof.X" is sizeof(X), "const.X" a macro value from the headers.
_PROGRAM = r"""
#define _GNU_SOURCE
#include <stddef.h>
#include <stdio.h>
#include "php.h"
#include "zend_globals.h"
#include "SAPI.h"
#include "zend_extensions.h"
#include "Optimizer/zend_optimizer.h"
/* php8.2-dev does not ship ext/opcache's headers: these are transcribed from php-src PHP-8.2
   ext/opcache/zend_accelerator_hash.h (the whole entry and hash) and ZendAccelerator.h (the first members
   of zend_accel_shared_globals, unchanged 8.1-8.4); php_opcache.py validates them on guest memory. */
typedef struct _zend_accel_hash_entry zend_accel_hash_entry;
struct _zend_accel_hash_entry {
  zend_ulong hash_value; zend_string *key; zend_accel_hash_entry *next; void *data; bool indirect;
};
typedef struct _zend_accel_hash {
  zend_accel_hash_entry **hash_table; zend_accel_hash_entry *hash_entries;
  uint32_t num_entries; uint32_t max_num_entries; uint32_t num_direct_entries;
} zend_accel_hash;
typedef enum _zend_accel_restart_reason {
  ACCEL_RESTART_OOM, ACCEL_RESTART_HASH, ACCEL_RESTART_USER
} zend_accel_restart_reason;
typedef struct _zend_accel_shared_globals {  /* the members up to restart_in_progress */
  zend_ulong hits; zend_ulong misses; zend_ulong blacklist_misses; zend_ulong oom_restarts;
  zend_ulong hash_restarts; zend_ulong manual_restarts; zend_accel_hash hash; size_t map_ptr_last;
  time_t start_time; time_t last_restart_time; time_t force_restart_time; bool accelerator_enabled;
  bool restart_pending; zend_accel_restart_reason restart_reason; bool cache_status_before_restart;
  bool restart_in_progress;
} zend_accel_shared_globals;
#define O(t, m) printf("\"%s.%s\": %zu,\n", #t, #m, offsetof(t, m))
#define S(t) printf("\"sizeof.%s\": %zu,\n", #t, sizeof(t))
#define C(n) printf("\"const.%s\": %ld,\n", #n, (long)(n))
int main(void) {
  S(zend_executor_globals); S(sapi_globals_struct); S(zend_execute_data); S(zend_op); S(HashTable); S(Bucket);
  S(zval);
  O(zend_executor_globals, current_execute_data); O(zend_executor_globals, included_files);
  O(zend_executor_globals, function_table); O(zend_executor_globals, class_table);
  O(zend_executor_globals, active);
  O(zend_execute_data, opline); O(zend_execute_data, func); O(zend_execute_data, prev_execute_data);
  O(zend_function, type); O(zend_function, common.function_name); O(zend_function, common.scope);
  O(zend_function, op_array.filename); O(zend_function, op_array.opcodes); O(zend_function, op_array.last);
  O(zend_function, op_array.line_start);
  O(zend_op, lineno);
  O(zend_string, len); O(zend_string, val);
  O(zend_class_entry, name);
  O(HashTable, u.flags); O(HashTable, nTableMask); O(HashTable, arData); O(HashTable, nNumUsed);
  O(HashTable, nNumOfElements); O(HashTable, nTableSize);
  O(Bucket, val); O(Bucket, key); O(zval, u1.type_info);
  O(sapi_globals_struct, request_info.request_method); O(sapi_globals_struct, request_info.query_string);
  O(sapi_globals_struct, request_info.request_uri); O(sapi_globals_struct, request_info.path_translated);
  S(zend_accel_hash_entry);
  O(zend_accel_hash_entry, hash_value); O(zend_accel_hash_entry, key); O(zend_accel_hash_entry, next);
  O(zend_accel_hash_entry, data); O(zend_accel_hash_entry, indirect);
  O(zend_accel_shared_globals, hits); O(zend_accel_shared_globals, misses);
  O(zend_accel_shared_globals, hash.hash_table); O(zend_accel_shared_globals, hash.hash_entries);
  O(zend_accel_shared_globals, hash.num_entries); O(zend_accel_shared_globals, hash.max_num_entries);
  O(zend_accel_shared_globals, hash.num_direct_entries); O(zend_accel_shared_globals, start_time);
  O(zend_accel_shared_globals, accelerator_enabled); O(zend_accel_shared_globals, restart_pending);
  O(zend_accel_shared_globals, restart_in_progress);
  O(zend_script, filename); O(zend_script, main_op_array);
  C(ZEND_INTERNAL_FUNCTION); C(ZEND_USER_FUNCTION); C(ZEND_EVAL_CODE);
  C(HASH_FLAG_PACKED); C(HASH_FLAG_UNINITIALIZED); C(IS_UNDEF);
  C(ZEND_MODULE_API_NO);
  printf("\"const.ZEND_EXTENSION_API_NO\": %ld\n", (long)ZEND_EXTENSION_API_NO);
  return 0;
}
"""

# derive_layout(<php8.2-dev 8.2.36-1~deb12u1>/usr/include/php/20220829), amd64, NTS
PHP82_NTS: dict[str, int] = {
    "sizeof.zend_executor_globals": 1800, "sizeof.sapi_globals_struct": 552, "sizeof.zend_execute_data": 80,
    "sizeof.zend_op": 32, "sizeof.HashTable": 56, "sizeof.Bucket": 32, "sizeof.zval": 16,
    "zend_executor_globals.current_execute_data": 488, "zend_executor_globals.included_files": 360,
    "zend_executor_globals.function_table": 432, "zend_executor_globals.class_table": 440,
    "zend_executor_globals.active": 992,
    "zend_execute_data.opline": 0, "zend_execute_data.func": 24, "zend_execute_data.prev_execute_data": 48,
    "zend_function.type": 0, "zend_function.common.function_name": 8, "zend_function.common.scope": 16,
    "zend_function.op_array.filename": 152, "zend_function.op_array.opcodes": 88,
    "zend_function.op_array.last": 80, "zend_function.op_array.line_start": 160,
    "zend_op.lineno": 24,
    "zend_string.len": 16, "zend_string.val": 24,
    "zend_class_entry.name": 8,
    "HashTable.u.flags": 8, "HashTable.nTableMask": 12, "HashTable.arData": 16, "HashTable.nNumUsed": 24,
    "HashTable.nNumOfElements": 28, "HashTable.nTableSize": 32,
    "Bucket.val": 0, "Bucket.key": 24, "zval.u1.type_info": 8,
    "sapi_globals_struct.request_info.request_method": 8, "sapi_globals_struct.request_info.query_string": 16,
    "sapi_globals_struct.request_info.request_uri": 48, "sapi_globals_struct.request_info.path_translated": 40,
    # opcache (structs transcribed into the program from php-src PHP-8.2 ext/opcache, see _PROGRAM)
    "sizeof.zend_accel_hash_entry": 40, "zend_accel_hash_entry.hash_value": 0, "zend_accel_hash_entry.key": 8,
    "zend_accel_hash_entry.next": 16, "zend_accel_hash_entry.data": 24, "zend_accel_hash_entry.indirect": 32,
    "zend_accel_shared_globals.hits": 0, "zend_accel_shared_globals.misses": 8,
    "zend_accel_shared_globals.hash.hash_table": 48, "zend_accel_shared_globals.hash.hash_entries": 56,
    "zend_accel_shared_globals.hash.num_entries": 64, "zend_accel_shared_globals.hash.max_num_entries": 68,
    "zend_accel_shared_globals.hash.num_direct_entries": 72, "zend_accel_shared_globals.start_time": 88,
    "zend_accel_shared_globals.accelerator_enabled": 112, "zend_accel_shared_globals.restart_pending": 113,
    "zend_accel_shared_globals.restart_in_progress": 121,
    "zend_script.filename": 0, "zend_script.main_op_array": 8,
    "const.ZEND_INTERNAL_FUNCTION": 1, "const.ZEND_USER_FUNCTION": 2, "const.ZEND_EVAL_CODE": 4,
    "const.HASH_FLAG_PACKED": 4, "const.HASH_FLAG_UNINITIALIZED": 8, "const.IS_UNDEF": 0,
    "const.ZEND_MODULE_API_NO": 20220829, "const.ZEND_EXTENSION_API_NO": 420220829,
}

# (ZEND_EXTENSION_API_NO, thread safety) as the binary's ZEND_EXTENSION_BUILD_ID states it -> layout
LAYOUTS: dict[tuple[int, str], dict[str, int]] = {(420220829, "NTS"): PHP82_NTS}


def derive_layout(include_dir: Path, cc: str = "gcc") -> dict[str, int]:
    """Compile and run the offsetof() program against php-dev headers (…/include/php/<API>); return its table."""
    flags = [f"-I{include_dir / sub}" for sub in ("", "main", "Zend", "TSRM", "ext")]
    with tempfile.TemporaryDirectory(prefix="nph-phplayout-") as tmp:
        src, exe = Path(tmp) / "layout.c", Path(tmp) / "layout"
        src.write_text(_PROGRAM)
        try:
            subprocess.run([cc, "-w", *flags, "-o", str(exe), str(src)], check=True, capture_output=True,
                           text=True, timeout=120)
            out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", "") or ""
            raise KnowledgeError(f"cannot build the PHP layout program against {include_dir}: {exc} "
                                 f"{detail[:400]}") from None
    return {str(k): int(v) for k, v in json.loads("{" + out + "}").items()}
