/* nephoscope's shipped rules: the code shapes of the lab's tampering techniques.
 * Each rule names what it matches and why it is suspicious in a VM's executable memory. */

rule nephoscope_injected_stub
{
    meta:
        description = "ptrace-injected stub: RIP-relative lea of its own data, counter increment, int3 trap"
        technique = "code-injection"
        severity = "critical"
    strings:
        // lea rsi,[rip+d32]; inc qword [rsi+d8]; int3
        $stub = { 48 8D 35 ?? ?? ?? ?? 48 FF 46 ?? CC }
    condition:
        $stub
}

rule nephoscope_injected_marker
{
    meta:
        description = "marker text the lab's injector writes next to its payload"
        technique = "code-injection"
        severity = "critical"
    strings:
        $marker = "NEPHOSCOPE-INJECTED-CODE"
    condition:
        $marker
}

rule nephoscope_trojan_padding
{
    meta:
        description = "bytes written over never-executed padding right after a ret (trojaned binary)"
        technique = "trojaned-binary"
        severity = "high"
    strings:
        // ret; "NPH-TROJ" where a multi-byte nop would be
        $patched = { C3 4E 50 48 2D 54 52 4F 4A }
    condition:
        $patched
}
