import os
import sys

# Tests run on the CPU, with 8 virtual devices for the sharding tests.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

# Exactness tests compare float32 results: keep GPUs from using TF32 matmuls.
jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402

# The slowest tests (each tens of seconds or more on a busy 2-core CPU, measured with
# --durations): marked `slow` here, in one list. README's test command runs the rest
# (`-m "not slow"`, ~15 minutes on 2 cores); .ci/run runs that command and then these
# (`-m slow`). A whole file, or file::test (every parametrization of it).
SLOW = {
    "test_fp8_model.py::test_sharded_training_matches_unsharded",
    "test_fp8_model.py::test_train_loss_falls_near_float32_and_resume_is_exact",
    "test_sft_task.py::test_sft_learns_the_answers_and_the_inverted_mask_does_not",
    "test_run_output.py::test_train_on_a_local_text_file_given_on_the_command_line",
    "test_tied.py::test_train_eval_and_generate_sharded_equal_one_device",
    "test_model.py::test_packed_row_gives_each_document_its_own_logits",
    "test_train.py::test_loss_falls_on_the_tiny_config",
    "test_train.py::test_same_losses_on_every_mesh",
    "test_lora_train.py::test_only_adapters_train_and_the_base_stays_bit_identical",
    "test_lora_train.py::test_resume_is_exact",
    "test_relative_paths.py::test_the_run_keeps_its_tokenizer_in_its_steps_only",
    "test_benchmarks.py", "test_notebooks.py",
    "test_attention.py::test_splash_gradients_match_xla",
    "test_chat.py::test_session_turns_equal_generate_on_the_whole_dialog",
    "test_chat_cli.py::test_terminal_chat", "test_chat_cli.py::test_ctrl_c_stops_the_answer_and_keeps_the_conversation",
    "test_checkpoint.py::test_load_onto_a_mesh_of_8_devices", "test_checkpoint.py::test_save_and_load_round_trip",
    "test_cli_bad_inputs.py::test_bad_inputs_give_one_line",
    "test_cli_help_and_logs.py::test_conversion_and_generate_print_no_warnings",
    "test_cli_help_and_logs.py::test_full_disk_is_one_line",
    "test_convert_errors.py::test_refuses_to_overwrite_and_leaves_nothing_on_failure",
    "test_convert_output_safety.py::test_as_a_script_exit_2_one_line",
    "test_chat.py::test_chat_cache_benchmark_smoke",
    "test_convert_tied.py::test_hf_tied_model_converts_with_logits_equal_to_transformers",
    "test_convert_tied.py::test_meta_export_carries_the_embedding_twice_and_comes_back_tied",
    "test_convert_tied.py::test_hf_round_trip_is_bit_exact_and_loads_in_transformers",
    "test_lora_train.py::test_train_loop_lora_from_init_from_resumes_exactly",
    "test_train.py::test_two_processes_train_checkpoint_resume_and_match_one_process",
    "test_train.py::test_sigterm_saves_and_exits_0_then_kill_9_then_resume_matches",
    "test_train.py::test_stop_and_resume_onto_another_mesh",
    "test_train_faults.py::test_kills_during_checkpoint_writes_and_pruning_resume_exactly",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        file = os.path.basename(item.path)
        if file in SLOW or f"{file}::{item.originalname}" in SLOW:
            item.add_marker(pytest.mark.slow)
