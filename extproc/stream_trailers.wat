;; Tollgate: give a metered stream's response a (still empty) trailer block.
;;
;; Envoy filters can only edit trailers that exist, and an HTTP/1.1 backend's SSE stream has
;; none. A proxy-wasm filter is the one built-in way to create them: at the last body chunk,
;; asking the host to edit the response trailers makes Envoy add an empty trailer map. The Lua
;; stream meter (stream_meter.lua, earlier in the chain, so later on the response path) then
;; writes the stream's credit figures into it. Envoy's HTTP/2 and HTTP/3 codecs send them as
;; trailers; its HTTP/1.1 codec drops them (trailers are off on the downstream side).
;;
;; Hand-written against the proxy-wasm ABI 0.2.1 because the toolchains that build proxy-wasm
;; modules are not installed here; `make wasm` (wasmtime's wat2wasm) turns it into
;; stream_trailers.wasm, and a test checks the two agree. The filter asks the host for no data,
;; so the host never calls the allocator; it exists because the ABI requires it.
(module
  (import "env" "proxy_remove_header_map_value"
    (func $remove_header (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  ;; the header "removed": one that never exists, so the call only creates the trailer map
  (data (i32.const 16) "x-tollgate-none")
  (global $heap (mut i32) (i32.const 1024))

  (func (export "proxy_abi_version_0_2_1"))

  ;; a bump allocator over the one page (grown if ever asked for more)
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $at i32)
    (local.set $at (global.get $heap))
    (global.set $heap (i32.add (local.get $at) (local.get $size)))
    (if (i32.gt_u (global.get $heap) (i32.mul (memory.size) (i32.const 65536)))
      (then
        (drop (memory.grow
          (i32.add (i32.div_u (local.get $size) (i32.const 65536)) (i32.const 1))))))
    (local.get $at))

  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))

  ;; WasmHeaderMapType 3 = response trailers; FilterDataStatus 0 = Continue
  (func (export "proxy_on_response_body")
    (param $context i32) (param $size i32) (param $end_of_stream i32) (result i32)
    (if (local.get $end_of_stream)
      (then (drop (call $remove_header (i32.const 3) (i32.const 16) (i32.const 15)))))
    (i32.const 0))
)
